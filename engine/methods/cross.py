"""Cross (Li, Togo, Ogawa, Haseyama): the paper's method, and Table 2's "Cross" and "Ours" rows.

Online network: backbone -> projector -> predictor (P). Target network: an EMA copy of
backbone -> projector (Y'), no gradients. For two views, L = L1 + L2 with
  L1 = 2 - 2 cos(P1, P2)   (the online predictions of the two views agree)
  L2 = 2 - 2 cos(P2, Y2')  (the online prediction of view 2 agrees with the target's)
The "momentum statistics in batch normalization" of the paper is read, following Momentum^2
Teacher, as a target whose BN layers normalise with statistics that move by momentum toward
each batch's (target_bn="momentum"); with "batch" the target uses plain batch statistics and
its running statistics are an EMA of the online ones. The paper's code is not public: this is
our reading (README, "Methods").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import kernels
from .. import dist
from ..models import mlp
from .base import Method, ema_tensors, frozen_copy, spread


@dataclass(frozen=True)
class CrossConfig:
    tau: float = 0.996  # paper: target EMA rate, constant, after every optimizer step
    proj_hidden: int = 512  # projector feat -> 512 -> 128
    proj_dim: int = 128  # projector output; the predictor outputs the same (README)
    pred_hidden: int = 4096  # paper: predictor hidden units
    target_bn: str = "momentum"  # momentum: target BN normalises with momentum statistics | batch
    target_bn_momentum: float = 0.99  # weight of the old statistic in the target's momentum BN


class MomentumBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN (1d or 2d) that normalises with momentum-updated statistics, also in training.

    Each call moves running_mean/var toward the batch's statistics, then normalises with
    them. The k-th call (num_batches_tracked counts them) gives the batch the weight
    max(1/k, 1 - stat_momentum): the first batch normalises with its own statistics, the
    first 1/(1 - stat_momentum) with their running average, then momentum takes over. Started
    at a fixed 0.01 from the online network's initial statistics (mean 0, var 1 from random
    weights), the target barely normalised for hundreds of steps and its outputs pointed one
    way (spread 0.18 against 0.82 batch-normalised); Momentum² Teacher, whose reading this is,
    also gives the first batch all the weight. Gradients never flow here (no_grad target).
    """

    stat_momentum: float  # set where the target's BN is swapped in (CrossConfig's setting)

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                if dist.world() > 1:
                    mean, var = dist.global_mean_var(x, dims)
                else:
                    xf = x.to(self.running_mean.dtype)  # statistics in the buffers' precision
                    mean, var = xf.mean(dims), xf.var(dims, unbiased=True)
                # A device scalar: no host sync, and a CUDA graph replays it step by step.
                w = (1.0 / (self.num_batches_tracked + 1).to(self.running_mean.dtype)).clamp(
                    min=1 - self.stat_momentum)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), w)
                self.running_var.lerp_(var.to(self.running_var.dtype), w)
                self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


def use_momentum_bn_(module: nn.Module, momentum: float) -> nn.Module:
    """Swap every BatchNorm in `module` for MomentumBatchNorm, keeping its parameters and state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = MomentumBatchNorm(child.num_features, eps=child.eps, affine=child.affine)
            new.load_state_dict(child.state_dict())
            new.num_batches_tracked.zero_()  # its own statistics start from its first batch
            new.stat_momentum = momentum
            setattr(module, name, new.to(child.weight.device if child.affine else "cpu"))
        else:
            use_momentum_bn_(child, momentum)
    return module


class Cross(Method):
    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: CrossConfig = CrossConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim)
        # The paper's predictor output (256) cannot be compared by cosine with the projector's
        # 128; it outputs the projector's dimension (README).
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.target = frozen_copy(nn.Sequential(backbone, self.projector))
        if cfg.target_bn == "momentum":
            use_momentum_bn_(self.target, cfg.target_bn_momentum).requires_grad_(False)
        else:  # the target's running statistics come from the EMA, not its own batches
            for m in self.target.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        # Online network: both views in one batch (one pass, one compiled graph).
        p1, p2 = self.predictor(self.projector(self.backbone(torch.cat([v1, v2])))).chunk(2)
        # Target network: view 2 only (L2 compares P2 with Y2'); no gradients.
        with torch.no_grad():
            y2 = self.target(v2)
        # L = (2 - 2cos(P1, P2)) + (2 - 2cos(P2, Y2')), batch mean, one fused kernel.
        loss = kernels.cross_loss(p1, p2, y2)
        return loss, {"spread": spread(p1)}

    def ema_pairs(self):
        online = nn.Sequential(self.backbone, self.projector)
        return ema_tensors(online, self.target, with_buffers=self.cfg.target_bn == "batch")

    def tau(self, step: int, total: int) -> float:
        return self.cfg.tau
