"""SimSiam (Chen & He, CVPR 2021): Table 2's "SimSiam" row.

No target network: one encoder, with a stop-gradient on the branch that is regressed.
Projector: three layers of `proj_dim` (BN after each, no ReLU after the last); predictor: a
bottleneck `proj_dim -> pred_hidden -> proj_dim`. With D(p, z) = 1 - cos(p, stopgrad(z)),
  L = (D(P1, Z2) + D(P2, Z1)) / 2,
the paper's -cos loss plus 1 (0 at agreement): its gradients exactly, so the shared SGD
settings train SimSiam as its loss was written. (Each row keeps its own paper's scale: BYOL
and Cross sum two 2 - 2cos terms, as their papers do.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ... import kernels
from ..models import mlp
from .base import Method, spread


@dataclass(frozen=True)
class SimSiamConfig:
    proj_dim: int = 2048  # SimSiam: projector feat -> 2048 -> 2048 -> 2048
    pred_hidden: int = 512  # SimSiam: predictor bottleneck 2048 -> 512 -> 2048


def projector3(d_in: int, d: int) -> nn.Sequential:
    """SimSiam's projector: (Linear, BN, ReLU) x2, then Linear and a BN without affine."""
    return nn.Sequential(nn.Linear(d_in, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                         nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                         nn.Linear(d, d, bias=False), nn.BatchNorm1d(d, affine=False))


class SimSiam(Method):
    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: SimSiamConfig = SimSiamConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projector3(feat_dim, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        # One encoder for both views, one pass.
        z = self.projector(self.backbone(torch.cat([v1, v2])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.detach().chunk(2)  # the stop-gradient: no gradient reaches the regressed branch
        # (D(P1, Z2) + D(P2, Z1)) / 2 as one batch of 2B rows: the kernel's mean of 2 - 2cos
        # over the rows is that average of 2D, hence the half.
        loss = 0.5 * kernels.cosine_loss(torch.cat([p1, p2]), torch.cat([z2, z1]))
        return loss, {"spread": spread(z1)}
