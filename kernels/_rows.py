"""What the row-wise cosine kernels (loss.py, cosine.py) share: the epsilon of their norms,
the accumulation dtype, and the tile shape of one program."""
from __future__ import annotations

import torch

from ._triton import triton

EPS = 1e-8  # a norm's floor, as F.normalize's eps
TILE = 1024  # elements per (rows x BLOCK_D) tile: 8 fp32 per thread at 4 warps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp64 stays fp64 (gradcheck)


def blocks(B: int, D: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile for B rows of D features."""
    block_d = min(triton.next_power_of_2(D), 256)
    block_b = min(max(TILE // block_d, 1), triton.next_power_of_2(B))
    return block_b, block_d
