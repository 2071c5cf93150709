"""Which data path feeds the training loop: the one place that chooses, and builds it.

`torch` (views.py, loader.py) runs everywhere; `dali` (dali.py) needs NVIDIA DALI, and `auto`
picks it only on a GPU (it runs on the CPU too, which is how the tests check it).
"""
from __future__ import annotations

import importlib.util


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all (a CPU-only torch, say)
        return False


def pick_backend(name: str, device: str, views: str = "two_crops") -> str:
    """The data path for --backend `name` on `device`, for a method's `views` (Method.views):
    auto takes DALI on a GPU where it is installed, and torch for PIRL's pretext views, which
    only the torch path makes (config.check refuses --backend dali for them)."""
    if name == "torch":
        return "torch"
    if name == "dali":
        if not dali_available():
            raise SystemExit("--backend dali: NVIDIA DALI is not installed "
                             "(pip install nvidia-dali-cuda120, or use --backend torch)")
        return "dali"
    if name != "auto":
        raise SystemExit(f"--backend must be auto, dali or torch, not {name!r}")
    return ("dali" if device.startswith("cuda") and views == "two_crops" and dali_available()
            else "torch")


def ssl_source(views: str, images, cfg, res):
    """The pretraining source that makes the views a method asks for (`Method.views`):
    "two_crops", or "pirl-<pretext>" (an augmented view, its pretext transform and the images'
    indices, pretext.py; torch path only: pick_backend routes `--backend auto` there)."""
    import torch

    if views.startswith("pirl-"):
        if res.backend == "dali":
            raise ValueError(f"the DALI backend cannot make {views!r} views")
        from .pretext import PretextSource

        return PretextSource(images, cfg.augment, res.per_rank_batch, cfg.runtime.seed,
                             res.device, res.rank, res.world_size, getattr(torch, res.dtype),
                             res.channels_last, pretext=views.removeprefix("pirl-"))
    if views != "two_crops":
        raise ValueError(f"no data source makes {views!r} views")
    if res.backend == "dali":
        from .dali import DaliTwoViewSource as Source
    else:
        from .loader import TwoViewSource as Source
    return Source(images, cfg.augment, res.per_rank_batch, cfg.runtime.seed, res.device, res.rank,
                  res.world_size, getattr(torch, res.dtype), res.channels_last)


def labelled_source(images, targets, cfg, res, train: bool):
    """The fine-tuning source: augmented and reshuffled when `train`, else the deterministic
    evaluation pass (every image once, in order), under a FinetuneConfig and resolved values."""
    import torch

    if res.backend == "dali":
        from .dali import DaliLabelledSource as Source
    else:
        from .loader import LabelledSource as Source
    return Source(images, targets, res.per_rank_batch, cfg.augment.size, res.device,
                  cfg.augment.train if train else None, cfg.runtime.seed, res.rank,
                  res.world_size, getattr(torch, res.dtype), res.channels_last)
