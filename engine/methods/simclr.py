"""SimCLR (Chen et al., ICML 2020): Table 2's "SimCLR" row.

One encoder and a projection MLP (feat -> feat -> 128). Each image's two views are a positive
pair; the other 2B - 2 views of the batch are its negatives. The NT-Xent loss is the cross
entropy of finding the positive among all others by cosine similarity / temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..models import mlp
from .base import Method, spread


@dataclass(frozen=True)
class SimCLRConfig:
    # SimCLR: projection feat -> feat -> 128; 0 = the feature dimension (config.check allows 0)
    proj_hidden: int = field(default=0, metadata={"min": 0})
    proj_dim: int = 128  # SimCLR: 128
    temperature: float = 0.1  # SimCLR: 0.1 (its batch-256 setting)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2B rows where rows i and i + B are the two views of one image.

    In float32 also under bf16 autocast: there z @ z.T ran in bf16, and at temperature 0.1
    the rounding of the logits put a 1% error on the gradient (against float64)."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        n = z.shape[0]
        logits = z @ z.T / temperature
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device),
                                    float("-inf"))
        positives = torch.arange(n, device=z.device).roll(n // 2)  # i <-> i + B
        return F.cross_entropy(logits, positives)


class SimCLR(Method):
    stats = ("spread", "pos_rank1")

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: SimCLRConfig = SimCLRConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(feat_dim, cfg.proj_hidden or feat_dim, cfg.proj_dim)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        mine = self.projector(self.backbone(torch.cat([v1, v2])))  # this rank's rows
        z = gather_views(mine)  # the global batch
        loss = nt_xent(z, self.cfg.temperature)
        # The statistics of the global batch, as one process computes them: spread reduces
        # over the ranks itself (given the gathered rows, it would count each one world times).
        return loss, {"spread": spread(mine.detach()), "pos_rank1": top1(z.detach())}


def gather_views(z: torch.Tensor) -> torch.Tensor:
    """Under torchrun, every rank's projections (with gradient), laid out as one process's
    [view 1 of the global batch; view 2 of it], so the negatives are the global batch's."""
    if dist.world() == 1:
        return z
    import torch.distributed._functional_collectives as fc  # differentiable, compilable

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    group = torch.distributed.group.WORLD
    halves = [part.chunk(2) for part in gather(z, 0, group).chunk(dist.world())]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


def top1(z: torch.Tensor) -> torch.Tensor:
    """Share of views whose nearest other view is their positive: contrastive accuracy."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0]
    sim = (z @ z.T).fill_diagonal_(float("-inf"))
    return (sim.argmax(1) == torch.arange(n, device=z.device).roll(n // 2)).float().mean()
