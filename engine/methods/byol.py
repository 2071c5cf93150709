"""BYOL (Grill et al., NeurIPS 2020): Table 2's "BYOL" row.

Online: backbone -> projector (4096 -> 256) -> predictor (4096 -> 256). Target: an EMA copy
of backbone -> projector whose rate rises from 0.996 to 1 by a cosine over the run. The loss
is symmetric: each view's prediction regresses the target projection of the other view,
  L = (2 - 2 cos(P1, Z2')) + (2 - 2 cos(P2, Z1')).
Everything else (backbone, 112-pixel views, batch, epochs, SGD) is the paper's protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ... import kernels
from ..models import mlp
from .base import Method, cosine_tau, ema_tensors, frozen_copy, spread


@dataclass(frozen=True)
class BYOLConfig:
    tau: float = 0.996  # BYOL: base EMA rate, raised to 1 by a cosine over the run
    proj_hidden: int = 4096  # BYOL: projector feat -> 4096 -> 256
    proj_dim: int = 256  # BYOL: 256
    pred_hidden: int = 4096  # BYOL: predictor 256 -> 4096 -> 256


class BYOL(Method):
    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: BYOLConfig = BYOLConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.target = frozen_copy(nn.Sequential(backbone, self.projector))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        # Online network: both views in one pass.
        p1, p2 = self.predictor(self.projector(self.backbone(torch.cat([v1, v2])))).chunk(2)
        # Target network: both views, no gradients (its BN sees the same batch as the online).
        with torch.no_grad():
            z1, z2 = self.target(torch.cat([v1, v2])).chunk(2)
        # Symmetric loss: P1 against Z2', P2 against Z1', as one batch of 2B rows (one launch).
        loss = 2 * kernels.cosine_loss(torch.cat([p1, p2]), torch.cat([z2, z1]))
        return loss, {"spread": spread(p1)}

    def ema_pairs(self):
        return ema_tensors(nn.Sequential(self.backbone, self.projector), self.target, False)

    def tau(self, step: int, total: int) -> float:
        return cosine_tau(self.cfg.tau, step, total)
