"""PIRL's inputs: an augmented view, its pretext transform, and the images' dataset indices.

For each image I of a batch the source yields (x, x_t, idx): x is a view drawn with the
config's view1 augmentation (as for the other methods), x_t a pretext transform of a second,
independently augmented crop (view2's augmentation), and idx the image's row in the training
array (its row in PIRL's memory bank).
  * jigsaw (Noroozi & Favaro; PIRL section 4): the crop is rendered at 3 x `cell` pixels and
    cut into a 3x3 grid of cells; from each cell a `tile`-pixel square is taken at a random
    integer offset (the "jitter": PIRL's 64-pixel tiles from 85-pixel cells, a gap of about
    (1 - 1/ratio) of the cell); the 9 tiles are then put in a random order per image. x_t is
    (9B, 3, tile, tile): slot j of image b holds the tile of cell perm[b, j].
  * rotation: the crop at the view size, turned by k * 90 degrees, k uniform in {0,1,2,3}.
Everything random comes from one generator seeded from (seed, epoch, step, rank), as in
loader.py: stateless, so a resumed run sees the same batches.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .loader import TwoViewSource, step_seed
from .views import normalize, render, sample_params

PRETEXTS = ("jigsaw", "rotation")


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


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each square image x[i] turned by k[i] * 90 degrees (torch.rot90's sense), no host sync."""
    out = x
    for turns in (1, 2, 3):
        out = torch.where((k == turns).view(-1, 1, 1, 1), torch.rot90(x, turns, (2, 3)), out)
    return out


class PretextSource(TwoViewSource):
    """Yields (x, x_t, idx) per step; order, sharding and seeding are TwoViewSource's."""

    def __init__(self, images, aug, batch_size, seed, device, rank=0, world_size=1,
                 dtype=torch.float32, channels_last=False, pretext: str = "jigsaw"):
        if pretext not in PRETEXTS:
            raise ValueError(f"no pretext {pretext!r}; known: {', '.join(PRETEXTS)}")
        super().__init__(images, aug, batch_size, seed, device, rank, world_size, dtype,
                         channels_last)
        self.pretext = pretext

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.shard(epoch).to(self.device, non_blocking=True)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch]
            self.gen.manual_seed(step_seed(self.seed, epoch, step, self.rank))
            yield (*self.views(self.images[idx], self.gen), idx)

    def views(self, images: torch.Tensor, gen: torch.Generator):
        n, a, dev = images.shape[0], self.aug, images.device
        x = render(images, sample_params(n, a.view1, gen, dev), a.view1, a.size)
        p = sample_params(n, a.view2, gen, dev)
        if self.pretext == "jigsaw":
            tile, cell = jigsaw_sizes(a.size)
            offsets, perm = sample_jigsaw(n, tile, cell, gen, dev)
            x_t = jigsaw_tiles(render(images, p, a.view2, 3 * cell), offsets, perm, tile, cell)
        else:
            k = torch.randint(0, 4, (n,), generator=gen, device=dev)
            x_t = rotate(render(images, p, a.view2, a.size), k)
        return (normalize(x, self.dtype, self.channels_last),
                normalize(x_t, self.dtype, self.channels_last))
