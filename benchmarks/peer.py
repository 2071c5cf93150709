"""The peer baseline: a BYOL-style step written the way popular SSL libraries write it.

What solo-learn, lightly and byol-pytorch users run today: PIL decoding and torchvision
transforms in persistent DataLoader worker processes with pinned memory (every epoch decodes
every file again), eager mode, one forward per view, the loss in plain ops, the target EMA
as a per-parameter Python loop, and the loss read back every step for logging (a host sync).
Two precisions, as their configs offer: fp32 (byol-pytorch's default) and bf16 autocast
(solo-learn's and Lightning's "bf16-mixed"). The model and the maths are the same as sstl's,
so the comparison isolates the engineering.

Earlier versions re-spawned the workers at every epoch of a tiny set (2 batches), which
measured process start-up, not the library: 225 img/s against 1,400-2,100 img/s for a peer
with persistent workers on a real set (issue 13). MODELS says what the rung stands for.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from sstl.engine.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ViewAugment


def view_transform(view: ViewAugment, size: int) -> T.Compose:
    s_lo, s_hi = view.blur_sigma
    return T.Compose([
        T.RandomResizedCrop(size, scale=view.crop_scale, ratio=view.crop_ratio),
        T.RandomHorizontalFlip(view.flip_p),
        T.RandomApply([T.ColorJitter(view.brightness, view.contrast)], p=view.jitter_p),
        T.RandomApply([T.GaussianBlur(2 * round(3 * s_hi) + 1, (s_lo, s_hi))], p=view.blur_p),
        T.Grayscale(num_output_channels=3),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViewFiles(Dataset):
    def __init__(self, paths: list[str], aug: AugmentConfig):
        self.paths = paths
        self.t1, self.t2 = (view_transform(v, aug.size) for v in aug.views())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            im = im.convert("L")
        return self.t1(im), self.t2(im)


MODELS = ("a solo-learn/lightly/byol-pytorch user: DataLoader with persistent workers "
          "(min(16, CPUs)), PIL + torchvision views, pinned memory; eager; per-view forwards; "
          "plain-ops loss; per-parameter EMA loop; loss.item() every step")


def peer_loader(paths: list[str], aug: AugmentConfig, batch_size: int, workers: int | None = None,
                pin_memory: bool = False) -> DataLoader:
    workers = min(16, os.cpu_count() or 1) if workers is None else workers
    return DataLoader(TwoViewFiles(paths, aug), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def peer_step(method, opt, v1, v2, tau: float, autocast=None) -> float:
    """The Cross step as a library user writes it: per-view passes, plain ops, EMA loop."""
    online = torch.nn.Sequential(method.backbone, method.projector)
    with autocast() if autocast else contextlib.nullcontext():
        p1 = method.predictor(online(v1))
        p2 = method.predictor(online(v2))
        with torch.no_grad():
            y2 = method.target(v2)
        loss = (2 - 2 * F.cosine_similarity(p1, p2, dim=-1)).mean() \
            + (2 - 2 * F.cosine_similarity(p2, y2, dim=-1)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    for po, pt in zip(online.parameters(), method.target.parameters()):
        pt.data.mul_(tau).add_(po.data, alpha=1 - tau)
    return loss.item()
