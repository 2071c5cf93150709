"""PIRL (Misra & van der Maaten, CVPR 2020): Table 2's "PIRL-Jigsaw" and "PIRL-Rotation" rows.

One backbone, two heads: f(v_I), a linear projection of image I's pooled feature to 128-d, and
g(v_It) of its pretext transform I_t (jigsaw: each of the 9 tiles encoded separately, each
tile's feature projected to 128, the 9 concatenated in slot order and projected to 128;
rotation: the turned image encoded and projected to 128). A memory bank keeps one L2-normalised
128-d row m_i per training image, a running average of f (PIRL's 0.5):
  m_i <- normalize(0.5 m_i + 0.5 f(v_i))      (after the step's loss, which uses the old bank)
With s(a, b) = cos(a, b), temperature T = 0.07, a set D_N of K negatives drawn uniformly from
the bank without image i (K = 32000, at most N - 1), and the noise-contrastive estimator
  h(a, m) = exp(s(a, m)/T) / (exp(s(a, m)/T) + K Zbar),
  L_NCE(m_i, a) = -log h(a, m_i) - sum_{j in D_N} log(1 - h(a, m_j)),
the loss is (batch mean)
  L = lambda L_NCE(m_i, g(v_It)) + (1 - lambda) L_NCE(m_i, f(v_i)),   lambda = 0.5.
The paper writes h with noise K/|D| next to an unnormalised model exp(s/T); the model density
is exp(s/T) / Z with Z = |D| Zbar, Zbar the mean of exp(s/T) over the step's negatives
(detached, per term), as the implementations PIRL descends from estimate it (NPID, VISSL's
NCE loss). Without Z the K negative terms start near K log 2 and dwarf the positive one. NPID
fixes Zbar after the first step; here the bank starts random and becomes structured within an
epoch, which would make a fixed Zbar too small and the loss grow with the structure, so it is
re-estimated every step. Negatives are drawn with replacement (as NPID's sampler does) from a
generator seeded by (seed, step): the step counter is a buffer, so resume is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loader import step_seed
from .base import Method, spread


@dataclass(frozen=True)
class PIRLConfig:
    proj_dim: int = 128  # PIRL: f and g project to 128; the memory bank's rows
    tile_dim: int = 128  # PIRL jigsaw: each tile's feature -> 128, 9 concatenated -> 128
    temperature: float = 0.07  # PIRL: 0.07
    negatives: int = 32000  # PIRL: 32000 negatives from the bank (at most N - 1)
    lam: float = 0.5  # PIRL: lambda, the weight of the f-to-pretext term
    bank_momentum: float = 0.5  # PIRL: m_i <- normalize(0.5 m_i + 0.5 f(v_i))


def nce_loss(q: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor,
             temperature: float, log_c: torch.Tensor) -> torch.Tensor:
    """Batch mean of -log h(q, m_idx) - sum_j log(1 - h(q, m_neg_j)), log_c = log(K Zbar).

    With u = s/T: log h = -softplus(log_c - u) and log(1 - h) = -softplus(u - log_c).
    q (B, D) unit rows; bank (N, D); idx (B,); neg (B, K). Scores against the whole bank are one
    (B, N) matmul; gathering scores (not rows) keeps K = 32000 per image affordable.
    """
    u = q @ bank.T / temperature
    pos = u.gather(1, idx[:, None]).squeeze(1)
    negs = u.gather(1, neg)
    return (F.softplus(log_c - pos) + F.softplus(negs - log_c).sum(1)).mean()


class PIRL(Method):
    views = ""  # set by each variant: "pirl-jigsaw" | "pirl-rotation"
    stats = ("spread", "invariance")
    graph_safe = False
    graph_unsafe_why = ("the negatives' generator is seeded from a host counter and the bank is "
                        "replaced, not updated in place, every step")

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: PIRLConfig = PIRLConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.f_head = nn.Linear(feat_dim, cfg.proj_dim)
        self.g_head = self.make_g_head(feat_dim)
        # State beyond the weights: the memory bank (sized by attach() once the data is known)
        # and the step counter that seeds the negatives.
        self.register_buffer("bank", torch.zeros(0, cfg.proj_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.seed, self._step, self._gen = 0, 0, None

    def make_g_head(self, feat_dim: int) -> nn.Module:
        raise NotImplementedError

    def pretext_features(self, x_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, n_images: int, seed: int) -> None:
        """The memory bank: one random unit row per training image (seeded), on our device."""
        self.seed = seed
        g = torch.Generator().manual_seed(step_seed(seed, 0xBA4C))
        bank = F.normalize(torch.randn(n_images, self.cfg.proj_dim, generator=g,
                                       dtype=torch.float64), dim=1)
        self.bank = bank.to(self.bank.device, torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)  # the host's copy of the counter (read once, at load)

    @torch.compiler.disable
    def negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K) bank rows, uniform over the N - 1 others of each image; seeded by the step."""
        n = self.bank.shape[0]
        if n < 2:
            raise RuntimeError("PIRL's memory bank is not sized: call attach(n_images, seed)")
        k = min(self.cfg.negatives, n - 1)
        if self._gen is None or self._gen.device != idx.device:
            self._gen = torch.Generator(device=idx.device)
        self._gen.manual_seed(step_seed(self.seed, self._step, 0x4E6))
        self._step += 1
        self.step.add_(1)
        r = torch.randint(0, n - 1, (idx.shape[0], k), generator=self._gen, device=idx.device)
        return r + (r >= idx[:, None]).long()  # skip image i itself

    @torch.compiler.disable
    @torch.no_grad()
    def update_bank(self, idx: torch.Tensor, f: torch.Tensor) -> None:
        m = self.cfg.bank_momentum
        rows = F.normalize(m * self.bank[idx] + (1 - m) * f, dim=1)
        # Out of place: the loss's backward still needs the bank it was computed with.
        self.bank = self.bank.index_copy(0, idx, rows)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor):
        f_raw = self.f_head(self.backbone(x))
        g_raw = self.pretext_features(x_t)
        neg = self.negatives(idx)
        with torch.autocast(x.device.type, enabled=False):  # the loss in the bank's float32
            bank, t, lam = self.bank, self.cfg.temperature, self.cfg.lam
            f = F.normalize(f_raw.to(bank.dtype), dim=1)
            g = F.normalize(g_raw.to(bank.dtype), dim=1)
            losses = []
            for q in (g, f):
                with torch.no_grad():  # log(K Zbar), Zbar from this step's negatives
                    zbar = (q @ bank.T / t).gather(1, neg).exp().mean()
                log_c = math.log(neg.shape[1]) + zbar.log()
                losses.append(nce_loss(q, bank, idx, neg, t, log_c))
            loss = lam * losses[0] + (1 - lam) * losses[1]
        self.update_bank(idx, f.detach())
        return loss, {"spread": spread(f), "invariance": (f * g).sum(1).mean().detach()}


class PIRLJigsaw(PIRL):
    views = "pirl-jigsaw"

    def make_g_head(self, feat_dim: int) -> nn.Module:
        self.tile_head = nn.Linear(feat_dim, self.cfg.tile_dim)
        return nn.Linear(9 * self.cfg.tile_dim, self.cfg.proj_dim)

    def pretext_features(self, x_t: torch.Tensor) -> torch.Tensor:
        tiles = self.tile_head(self.backbone(x_t))  # (9B, tile_dim), each tile on its own
        return self.g_head(tiles.reshape(-1, 9 * self.cfg.tile_dim))  # concatenated in slot order


class PIRLRotation(PIRL):
    views = "pirl-rotation"

    def make_g_head(self, feat_dim: int) -> nn.Module:
        return nn.Linear(feat_dim, self.cfg.proj_dim)

    def pretext_features(self, x_t: torch.Tensor) -> torch.Tensor:
        return self.g_head(self.backbone(x_t))
