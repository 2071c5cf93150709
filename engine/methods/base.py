"""What every self-supervised method is to the loop: a module with one visible step.

A method is an nn.Module holding its networks and heads. The loop calls only:
  forward(v1, v2) -> (loss, stats)   the whole step up to the loss: views in, online forward,
                                      target forward under no_grad, loss. `stats` are 0-dim
                                      device tensors (no host sync), averaged per epoch.
  trainable()                        the parameters SGD updates
  ema_pairs()                        (online, target) tensors the EMA averages; [] = no target
  tau(step, total)                   the EMA rate at a global step
  attach(n_images, seed)             per-image state (PIRL's memory bank), sized once the data is
                                     known; a no-op for the others
  encoder                            the backbone fine-tuning starts from
and reads `views` (which views the data seam must make: "two_crops", or PIRL's
"pirl-<pretext>", whose batches are (x, x_t, idx)) and `stats` (names, in order).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist


class Method(nn.Module):
    views = "two_crops"  # the data seam makes two augmented crops of each image
    stats: tuple[str, ...] = ("spread",)
    # Whether the step can be replayed as a CUDA graph (engine/accel.py): everything that
    # changes between steps lives in device tensors updated in place. If not, why not.
    graph_safe = True
    graph_unsafe_why = ""

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [], []

    def tau(self, step: int, total: int) -> float:
        return 1.0

    def attach(self, n_images: int, seed: int) -> None:
        """Told the training set's size before training (PIRL sizes its memory bank here)."""


def spread(z: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of L2-normalised outputs across the batch, times sqrt(D).

    About 1 while outputs use every direction, 0 when they collapse to one vector: the
    failure mode of non-contrastive methods (SimSiam, Chen & He 2021, section 4.1).
    """
    z = F.normalize(z.detach().float(), dim=1)
    if dist.world() == 1:
        return z.std(0).mean() * z.shape[1] ** 0.5
    # Under torchrun, the std of the global batch (not a mean of the ranks' stds).
    _, var = dist.global_mean_var(z, [0])
    return (var.clamp(min=0).sqrt().mean() * z.shape[1] ** 0.5).float()


def cosine_tau(base: float, step: int, total: int) -> float:
    """BYOL's schedule: tau rises from `base` to 1 along a half cosine over the run."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(total, 1)) + 1) / 2


def ema_tensors(online: nn.Module, target: nn.Module,
                with_buffers: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Aligned (online, target) tensors for the flat EMA; integer buffers never average."""
    o, t = list(online.parameters()), list(target.parameters())
    if with_buffers:
        o += [b for b in online.buffers() if b.is_floating_point()]
        t += [b for b in target.buffers() if b.is_floating_point()]
    return o, t


def frozen_copy(module: nn.Module) -> nn.Module:
    """The target network's start: a copy of the online one, out of autograd."""
    import copy

    return copy.deepcopy(module).requires_grad_(False)
