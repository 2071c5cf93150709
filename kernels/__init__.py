"""sstl.kernels: the single dispatch point for the fused kernels.

    cross_loss(p1, p2, y2) -> scalar loss (fp32; fp64 for fp64 inputs)   Cross
    cosine_loss(a, b)      -> mean(2 - 2 cos(a, b)), gradient to a only    BYOL, SimSiam
    ema_(target, online, tau)   target <- tau * target + (1 - tau) * online, in place; tau a
                                float or a 0-dim device tensor (CUDA graphs)

Triton runs when the tensors are on CUDA and triton imports; everything else uses the torch
reference path (same math). The environment variable SSTL_KERNELS overrides the choice:
    auto       (default) as above
    triton     always Triton; on CPU this needs TRITON_INTERPRET=1 (tests only: it is slow)
    reference  never Triton
Nothing here imports sstl.engine: imports run downhill, cli -> engine -> kernels.
"""

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON
from .cosine import CosineLoss, cosine_loss_op, cosine_loss_reference
from .ema import FlatParams, ema_loop_, ema_reference_, ema_triton_
from .loss import CrossLoss, cross_loss_op, cross_loss_reference

__all__ = ["cross_loss", "cosine_loss", "cosine_loss_reference", "ema_", "FlatParams", "cross_loss_reference", "ema_reference_",
           "ema_loop_", "ema_triton_", "triton_available", "use_triton"]


def triton_available(device) -> bool:
    """Whether Triton kernels can run on tensors of `device` (CPU: only via the interpreter)."""
    kind = torch.device(device).type
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return HAS_TRITON and (kind == "cuda" or (kind == "cpu" and interpreted))


def use_triton(device) -> bool:
    """The backend choice for tensors on `device`, honouring SSTL_KERNELS."""
    mode = os.environ.get("SSTL_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available(device):
            raise RuntimeError(f"SSTL_KERNELS=triton but Triton cannot run on {device} "
                               "(triton missing, or CPU without TRITON_INTERPRET=1)")
        return True
    if mode == "auto":
        return torch.device(device).type == "cuda" and triton_available(device)
    raise ValueError(f"SSTL_KERNELS must be auto, triton or reference, not {mode!r}")


def cross_loss(p1: Tensor, p2: Tensor, y2: Tensor) -> Tensor:
    """The Cross loss; gradients flow to p1 and p2, never to y2."""
    fused = use_triton(p1.device)
    if torch.compiler.is_compiling():  # the custom op traces; eager skips its dispatch cost
        return cross_loss_op(p1, p2, y2, fused)[0]
    return CrossLoss.apply(p1, p2, y2, fused)


def cosine_loss(a: Tensor, b: Tensor) -> Tensor:
    """mean(2 - 2 cos(a_i, b_i)); gradients flow to a, never to b."""
    fused = use_triton(a.device)
    if torch.compiler.is_compiling():
        return cosine_loss_op(a, b.detach(), fused)[0]
    return CosineLoss.apply(a, b.detach(), fused)


def ema_(target: FlatParams, online: FlatParams, tau: float | Tensor) -> None:
    """In-place EMA of the target network's flat parameters towards the online ones.
    float64 buffers take the reference: the kernel computes in float32."""
    fused = use_triton(target.flat.device) and target.flat.dtype != torch.float64
    (ema_triton_ if fused else ema_reference_)(target, online, tau)
