"""The portable view path: a whole batch of augmented views, made on the training device.

Augmentation is split in two so that other backends (DALI) and the NumPy reference in the
tests can reproduce it exactly: `sample_params` draws every random number for a batch, and
`render` is a pure function of the images and those numbers. Conventions (shared by all):
  * crop box (x0, y0, w, h) in fractions of the source side; output pixel j of V samples the
    source at x0 + (j + 0.5) / V * w (pixel centres, bilinear, border-clamped), so a full box
    is a plain resize. A flipped view reads its row right to left.
  * blur: separable Gaussian, radius ceil(3 * sigma_max), weights exp(-t^2 / (2 sigma^2))
    normalised, reflect padding; sigma 0 means no blur.
  * jitter, after blur: x * brightness, then (x - mean) * contrast + mean (per image), clamped.
  * grey is replicated to 3 channels and normalised with ImageNet's mean and std.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ViewAugment


@dataclass
class ViewParams:
    box: torch.Tensor  # (B, 4) x0, y0, w, h as fractions of the source image
    flip: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) blur sigma in output pixels, 0 = none
    brightness: torch.Tensor  # (B,) factor, 1 = none
    contrast: torch.Tensor  # (B,) factor, 1 = none

    def rows(self, rank: int, world: int) -> "ViewParams":
        """This rank's rows of a global batch's draws (rows rank::world): how N processes
        augment each image exactly as one process would."""
        if world == 1:
            return self
        return ViewParams(*(getattr(self, f.name)[rank::world] for f in fields(ViewParams)))


CROP_TRIES = 10  # torchvision's RandomResizedCrop draws at most 10 boxes before the fallback


def sample_params(n: int, aug: ViewAugment, gen: torch.Generator, device) -> ViewParams:
    """Draw the random numbers for n views, on `device`, from `gen` only (reproducible)."""
    u = torch.rand(n, 8, generator=gen, device=device)
    bc = torch.rand(n, 2, generator=gen, device=device) * 2 - 1
    # torchvision's RandomResizedCrop (BYOL's): up to CROP_TRIES (area, ratio) draws per view,
    # the first whose box fits is taken, else the whole image. All tries in one step. (The
    # extra draws move the generator on: a run resumed from a checkpoint of an earlier
    # version sees other views than it would have.)
    more = torch.rand(n, CROP_TRIES - 1, 2, generator=gen, device=device)
    tries = torch.cat([u[:, None, :2], more], dim=1)  # (n, tries, 2)
    lo, hi = aug.crop_scale
    area = lo + (hi - lo) * tries[..., 0]
    log_r = math.log(aug.crop_ratio[0]) + math.log(aug.crop_ratio[1] / aug.crop_ratio[0]) * tries[..., 1]
    ratio = torch.exp(log_r)
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
    some, one = fits.any(dim=1), torch.ones_like(u[:, 0])
    w = torch.where(some, w.gather(1, first)[:, 0], one)
    h = torch.where(some, h.gather(1, first)[:, 0], one)
    box = torch.stack([(1 - w) * u[:, 2], (1 - h) * u[:, 3], w, h], dim=1)
    s_lo, s_hi = aug.blur_sigma
    sigma = torch.where(u[:, 5] < aug.blur_p, s_lo + (s_hi - s_lo) * u[:, 6], torch.zeros_like(w))
    jit = u[:, 7] < aug.jitter_p
    return ViewParams(box=box, flip=u[:, 4] < aug.flip_p, sigma=sigma,
                      brightness=torch.where(jit, 1 + aug.brightness * bc[:, 0], one),
                      contrast=torch.where(jit, 1 + aug.contrast * bc[:, 1], one))


def crop_resize(images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, size, size) float32 in [0, 1]: crop, resize, flip in one gather."""
    b = images.shape[0]
    t = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size
    tx = torch.where(flip[:, None], 1 - t, t)  # (B, V)
    xs = box[:, 0:1] + tx * box[:, 2:3]  # source x in [0, 1]
    ys = box[:, 1:2] + t * box[:, 3:4]
    grid = torch.stack([xs[:, None, :].expand(b, size, size),
                        ys[:, :, None].expand(b, size, size)], dim=-1) * 2 - 1
    src = images[:, None].float() / 255.0
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def blur_radius(aug: ViewAugment) -> int:
    return max(1, math.ceil(3 * aug.blur_sigma[1]))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, 1, H, W); sigma 0 leaves a sample unchanged."""
    b, _, h, w = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.clamp(min=1e-6)[:, None]
    k = torch.exp(-(t[None] ** 2) / (2 * s ** 2))
    k = torch.where(sigma[:, None] > 0, k, (t[None] == 0).float())
    k = k / k.sum(dim=1, keepdim=True)
    y = F.pad(x.reshape(1, b, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(y, k.view(b, 1, -1, 1), groups=b)
    return y.view(b, 1, h, w)


def jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    x = x * brightness.view(-1, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast.view(-1, 1, 1, 1) + mean).clamp(0, 1)


def normalize(x: torch.Tensor, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """(B, 1, H, W) grey in [0, 1] -> (B, 3, H, W) with ImageNet normalisation."""
    mean, std = _imagenet_stats(x.device)
    y = ((x - mean) / std).to(dtype)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on `device`, made once per device.

    Made per call, they were a host-to-device copy of a Python list: PyTorch synchronises the
    stream after such a copy, so every view of every step waited for the GPU to finish all
    queued work (the previous step) before the next step's launches could be queued."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def render(images: torch.Tensor, p: ViewParams, aug: ViewAugment, size: int) -> torch.Tensor:
    """One augmented view of every image, grey in [0, 1], (B, 1, size, size) float32."""
    x = crop_resize(images, p.box, p.flip, size)
    x = gaussian_blur(x, p.sigma, blur_radius(aug))
    return jitter(x, p.brightness, p.contrast)


def two_views(images: torch.Tensor, aug: AugmentConfig, gen: torch.Generator,
              dtype=torch.float32, channels_last: bool = False,
              share: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining seam's torch implementation: (B, S, S) uint8 -> two normalised views.

    share=(rank, world): the random numbers are drawn for the global batch of world * B
    images and this rank keeps rows rank::world (its images' rows in the global batch), so
    N processes augment each image exactly as one process would."""
    rank, world = share
    out = []
    for view in aug.views():
        p = sample_params(images.shape[0] * world, view, gen, images.device).rows(rank, world)
        out.append(normalize(render(images, p, view, aug.size), dtype, channels_last))
    return out[0], out[1]


def eval_view(images: torch.Tensor, size: int, dtype=torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """Deterministic evaluation input: an antialiased resize of the whole image."""
    x = images[:, None].float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x.clamp(0, 1), dtype, channels_last)
