"""Which data path feeds the training loop: the one place that chooses, and builds it.

`torch` (views.py, loader.py) runs everywhere; `dali` (dali.py) needs NVIDIA DALI and a GPU.
"""
from __future__ import annotations

import importlib.util


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def pick_backend(name: str, device: str) -> str:
    if name == "torch":
        return "torch"
    if name == "dali":
        if not dali_available():
            raise SystemExit("--backend dali: NVIDIA DALI is not installed "
                             "(pip install nvidia-dali-cuda120, or use --backend torch)")
        return "dali"
    if name != "auto":
        raise SystemExit(f"--backend must be auto, dali or torch, not {name!r}")
    return "dali" if device.startswith("cuda") and dali_available() else "torch"


def two_view_source(images, cfg, res):
    """The pretraining view source for `images` (N, S, S uint8) under config and resolved values."""
    import torch

    dtype = getattr(torch, res.dtype)
    if res.backend == "dali":
        from .dali import DaliTwoViewSource

        return DaliTwoViewSource(images, cfg.augment, res.per_rank_batch, cfg.seed, res.device,
                                 res.rank, res.world_size, dtype, res.channels_last)
    from .loader import TwoViewSource

    return TwoViewSource(images, cfg.augment, res.per_rank_batch, cfg.seed, res.device,
                         res.rank, res.world_size, dtype, res.channels_last)
