"""The self-supervised method of Li et al.: its heads, its target network and its loss.

Online network: backbone -> projector -> predictor (P). Target network: an EMA copy of
backbone -> projector (Y'), no gradients. For two views, L = L1 + L2 with
  L1 = 2 - 2 cos(P1, P2)   (the online predictions of the two views agree)
  L2 = 2 - 2 cos(P2, Y2')  (the online prediction of view 2 agrees with the target's)
The "momentum statistics in batch normalization" of the paper's title is read, following
Momentum^2 Teacher, as a target whose BN layers normalise with statistics that move by
momentum toward each batch's, instead of the batch's own (target_bn="momentum"); with
target_bn="batch" the target uses plain batch statistics and its running statistics are an
EMA of the online ones. The paper's code is not public: this is our reading (see README).

Other methods of Table 2 (BYOL, SimSiam, ...) will be siblings of this small object, each
with its own heads and loss; the training loop only calls predict / target_project / loss.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from .models import mlp


class MomentumBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN (1d or 2d) that normalises with momentum-updated statistics, also in training.

    Each call moves running_mean/var toward the batch's statistics by (1 - stat_momentum),
    then normalises with them. Gradients never flow here (the target runs under no_grad).
    """

    stat_momentum: float = 0.99

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                xf = x.to(self.running_mean.dtype)  # statistics in the buffers' precision
                self.running_mean.lerp_(xf.mean(dims), 1 - self.stat_momentum)
                self.running_var.lerp_(xf.var(dims, unbiased=True), 1 - self.stat_momentum)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


def use_momentum_bn_(module: nn.Module, momentum: float) -> nn.Module:
    """Swap every BatchNorm in `module` for MomentumBatchNorm, keeping its parameters and state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = MomentumBatchNorm(child.num_features, eps=child.eps, affine=child.affine)
            new.load_state_dict(child.state_dict())
            new.stat_momentum = momentum
            setattr(module, name, new.to(child.weight.device if child.affine else "cpu"))
        else:
            use_momentum_bn_(child, momentum)
    return module


class Cross(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 512,
                 proj_dim: int = 128, pred_hidden: int = 4096, target_bn: str = "momentum",
                 target_bn_momentum: float = 0.99):
        super().__init__()
        if target_bn not in ("momentum", "batch"):
            raise SystemExit(f"--target-bn must be momentum or batch, not {target_bn!r}")
        self.target_bn = target_bn
        self.online = nn.Sequential(backbone, mlp(feat_dim, proj_hidden, proj_dim))
        # The paper's predictor output (256) cannot be compared by cosine with the projector's
        # 128; it outputs the projector's dimension (README).
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim)
        self.target = copy.deepcopy(self.online)
        if target_bn == "momentum":
            use_momentum_bn_(self.target, target_bn_momentum)
        else:  # the target's running statistics come from the EMA, not its own batches
            for m in self.target.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
        self.target.requires_grad_(False)  # after the BN swap, which makes new parameters

    @property
    def encoder(self) -> nn.Module:
        """The online backbone: what fine-tuning starts from."""
        return self.online[0]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.online(x))

    @torch.no_grad()
    def target_project(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x)

    @staticmethod
    def loss(p1: torch.Tensor, p2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return kernels.cross_loss(p1, p2, y2)

    def ema_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(online, target) tensors the EMA averages, aligned; integer buffers never are."""
        online = list(self.online.parameters())
        target = list(self.target.parameters())
        if self.target_bn == "batch":
            online += [b for b in self.online.buffers() if b.is_floating_point()]
            target += [b for b in self.target.buffers() if b.is_floating_point()]
        return online, target
