"""PIRL's inputs: an augmented view, its pretext transform, and the images' dataset indices.

For each image I of a batch the source yields (x, x_t, idx): x is a view drawn with the
config's view1 augmentation (as for the other methods), x_t a pretext transform of a second,
independently augmented crop (view2's augmentation), and idx the image's row in the training
array (its row in PIRL's memory bank).
  * jigsaw (Noroozi & Favaro; PIRL section 4): the crop (area 60-100% of the image, as the
    PIRL authors' VISSL configuration takes it for the patches, where the views take 20-100%;
    blurred as view2) is rendered at 3 x `cell` pixels and cut into a 3x3 grid of cells; from
    each cell a `tile`-pixel square is taken at a random integer offset (the "jitter": PIRL's
    64-pixel tiles from 85-pixel cells, a gap of about (1 - 1/ratio) of the cell); each tile
    is then flipped and brightness/contrast-jittered on its own draws (view2's settings), as
    VISSL augments every patch separately, so tiles cannot be matched by a shared flip or
    tone; the 9 tiles are put in a random order per image. x_t is (9B, 3, tile, tile): slot j
    of image b holds the tile of cell perm[b, j].
  * rotation: the crop at the view size, turned by k * 90 degrees, k uniform in {0,1,2,3}.
Everything random comes from one generator seeded from (seed, epoch, step, rank): stateless,
so a resumed run sees the same batches. (loader.py seeds without the rank, so every torchrun
process draws the global batch's numbers; PIRL runs in one process, its memory bank being
unshared, so rank is 0 here.)
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from .augment import ViewAugment
from .loader import TwoViewSource, step_seed
from .views import jitter, normalize, render, sample_params

PRETEXTS = ("jigsaw", "rotation")
# The area fraction of the crop the jigsaw is cut from: VISSL's PIRL configurations'
# `crop_scale_patches` (the views' 20-100% could leave 9 tiles of a fifth of the image).
JIGSAW_CROP_SCALE = (0.6, 1.0)


def jigsaw_sizes(view_size: int) -> tuple[int, int]:
    """(tile, cell) pixels for a view size: PIRL's 64-pixel tiles of 85-pixel cells at 224."""
    tile = max(8, round(view_size * 64 / 224))
    return tile, tile + max(1, round(tile * 21 / 64))


def sample_jigsaw(n: int, tile: int, cell: int, gen: torch.Generator, device):
    """Per image: (n, 9, 2) integer (y, x) offsets of each cell's tile, (n, 9) a permutation."""
    offsets = (torch.rand(n, 9, 2, generator=gen, device=device) * (cell - tile + 1)).long()
    perm = torch.rand(n, 9, generator=gen, device=device).argsort(dim=1)
    return offsets.clamp_(max=cell - tile), perm


def jigsaw_tiles(crop: torch.Tensor, offsets: torch.Tensor, perm: torch.Tensor,
                 tile: int, cell: int) -> torch.Tensor:
    """(B, C, 3cell, 3cell) -> (9B, C, tile, tile): slot j of image b is cell perm[b, j]'s tile.

    Cell c (row-major, c = 3 * row + col) starts at (row * cell, col * cell); its tile is the
    tile x tile square at offsets[b, c] inside it. One gather, no host sync.
    """
    b, ch = crop.shape[:2]
    cells = perm  # (B, 9): the source cell of each slot
    off = offsets.gather(1, cells[..., None].expand(b, 9, 2))  # offsets of those cells
    r = torch.arange(tile, device=crop.device)
    ys = (cells // 3 * cell + off[..., 0])[..., None] + r  # (B, 9, tile)
    xs = (cells % 3 * cell + off[..., 1])[..., None] + r
    bi = torch.arange(b, device=crop.device).view(b, 1, 1, 1)
    tiles = crop.permute(0, 2, 3, 1)[bi, ys[..., :, None], xs[..., None, :]]  # (B,9,t,t,C)
    return tiles.permute(0, 1, 4, 2, 3).reshape(b * 9, ch, tile, tile)


def augment_tiles(tiles: torch.Tensor, aug: ViewAugment, gen: torch.Generator) -> torch.Tensor:
    """(9B, 1, t, t) grey tiles, each flipped and brightness/contrast-jittered on its own draw
    (the view's probabilities and ranges; the crop and blur were the whole image's)."""
    p = sample_params(tiles.shape[0], aug, gen, tiles.device)
    tiles = torch.where(p.flip.view(-1, 1, 1, 1), tiles.flip(-1), tiles)
    return jitter(tiles, p.brightness, p.contrast)


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each square image x[i] turned by k[i] * 90 degrees (torch.rot90's sense), no host sync."""
    out = x
    for turns in (1, 2, 3):
        out = torch.where((k == turns).view(-1, 1, 1, 1), torch.rot90(x, turns, (2, 3)), out)
    return out


class PretextSource(TwoViewSource):
    """Yields (x, x_t, idx) per step; order and sharding are TwoViewSource's, the seed per
    step is this module's (see its docstring)."""

    def __init__(self, images, aug, batch_size, seed, device, rank=0, world_size=1,
                 dtype=torch.float32, channels_last=False, pretext: str = "jigsaw",
                 jigsaw_crop_scale: tuple[float, float] = JIGSAW_CROP_SCALE):
        if pretext not in PRETEXTS:
            raise ValueError(f"no pretext {pretext!r}; known: {', '.join(PRETEXTS)}")
        super().__init__(images, aug, batch_size, seed, device, rank, world_size, dtype,
                         channels_last)
        self.pretext = pretext
        # The jigsaw's crop: view2's scale range replaced, its flip and jitter left to the tiles.
        self.jigsaw_crop = dataclasses.replace(aug.view2, crop_scale=jigsaw_crop_scale,
                                               flip_p=0.0, jitter_p=0.0)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.shard(epoch).to(self.device, non_blocking=True)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch]
            self.gen.manual_seed(step_seed(self.seed, epoch, step, self.rank))
            yield (*self.views(self.images[idx], self.gen), idx)

    def views(self, images: torch.Tensor, gen: torch.Generator):
        n, a, dev = images.shape[0], self.aug, images.device
        x = render(images, sample_params(n, a.view1, gen, dev), a.view1, a.size)
        if self.pretext == "jigsaw":
            tile, cell, crop = *jigsaw_sizes(a.size), self.jigsaw_crop
            p = sample_params(n, crop, gen, dev)
            offsets, perm = sample_jigsaw(n, tile, cell, gen, dev)
            tiles = jigsaw_tiles(render(images, p, crop, 3 * cell), offsets, perm, tile, cell)
            x_t = augment_tiles(tiles, a.view2, gen)
        else:
            p = sample_params(n, a.view2, gen, dev)
            k = torch.randint(0, 4, (n,), generator=gen, device=dev)
            x_t = rotate(render(images, p, a.view2, a.size), k)
        return (normalize(x, self.dtype, self.channels_last),
                normalize(x_t, self.dtype, self.channels_last))
