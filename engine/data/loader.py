"""Batches on the device: the seam between the data layer and the training loops.

A view source is anything with `steps_per_epoch` and `epoch(epoch, start_step=0)`, an
iterator of ready model inputs. Everything random is a function of (seed, epoch, step):
the order of an epoch comes from (seed, epoch), a step's augmentation from (seed, epoch,
step), drawn for the global batch, of which each rank keeps its rows (pretraining and
fine-tuning alike), so N processes see the views one process would. A resumed run
therefore sees exactly the batches it would have seen, from any step, with no iterator state
to save. Sharding takes the global rank and world size.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch

from .augment import AugmentConfig, ViewAugment
from .views import eval_view, normalize, render, sample_params, two_views


def step_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stateless: no generator state to checkpoint)."""
    digest = hashlib.blake2b(np.array(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of an epoch, identical on every rank and every device."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)


def lone_last_batch(per_rank: int, batch_size: int, train: bool) -> bool:
    """Whether a training epoch would end on a batch of one image, which BatchNorm cannot
    train on (one value per channel where the feature map is 1 x 1). That step is skipped:
    the epoch's order is reshuffled, so it leaves out a different image each epoch."""
    return train and per_rank % batch_size == 1 and per_rank > 1


def pad_to_world(order: torch.Tensor, world: int) -> torch.Tensor:
    """The order, its head repeated until its length divides by `world` (every rank then gets
    as many images: DDP's collectives need as many steps). Repeats the order as often as it
    takes, so a subset smaller than the number of processes still fills every rank."""
    short = -len(order) % world
    if not short:
        return order
    return torch.cat([order, order.repeat(-(-short // len(order)))[:short]])


# An epoch's plan, shared by the torch sources below and the DALI ones (dali.py): both
# backends must step through the same images in the same order.

def ssl_steps(n: int, batch_size: int, world: int) -> int:
    """Pretraining steps per epoch: the last partial batch is dropped (BN statistics and the
    loss need full batches)."""
    steps = n // (batch_size * world)
    if steps == 0:
        raise SystemExit(f"{n} training images are fewer than one batch of "
                         f"{batch_size * world}; lower --batch-size")
    return steps


def ssl_shard(n: int, seed: int, epoch: int, steps: int, batch_size: int, rank: int,
              world: int) -> torch.Tensor:
    """This rank's images of a pretraining epoch, in order."""
    return epoch_order(n, seed, epoch)[:steps * batch_size * world][rank::world]


def labelled_steps(n: int, batch_size: int, world: int, train: bool) -> int:
    """Fine-tuning/evaluation steps per epoch: every image counts (low-label subsets can be
    smaller than one batch), but a training epoch never ends on a lone image."""
    per_rank = -(-n // world)
    return -(-per_rank // batch_size) - lone_last_batch(per_rank, batch_size, train)


def labelled_shard(n: int, seed: int, epoch: int, rank: int, world: int,
                   train: bool) -> torch.Tensor:
    """This rank's images of a labelled epoch: shuffled and padded so every rank takes as
    many steps (DDP) when training, in index order when evaluating."""
    if not train:
        return torch.arange(n)[rank::world]
    return pad_to_world(epoch_order(n, seed, epoch), world)[rank::world]


def to_device_images(images: np.ndarray, device) -> torch.Tensor:
    """The uint8 cache rows, resident on the device (a 224^2 image is 50 kB: 20k fit in 1 GB)."""
    # np.require copies only what must be copied: a read-only memory map or a strided view.
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device)


class TwoViewSource:
    """Pretraining: both augmented views of each batch, made on the device by torch ops."""

    def __init__(self, images: np.ndarray, aug: AugmentConfig, batch_size: int, seed: int,
                 device, rank: int = 0, world_size: int = 1, dtype=torch.float32,
                 channels_last: bool = False):
        self.images = to_device_images(images, device)
        self.aug, self.batch, self.seed, self.device = aug, batch_size, seed, torch.device(device)
        self.rank, self.world = rank, world_size
        self.dtype, self.channels_last = dtype, channels_last
        self.steps_per_epoch = ssl_steps(len(self.images), batch_size, world_size)
        self.gen = torch.Generator(device=self.device)

    def shard(self, epoch: int) -> torch.Tensor:
        return ssl_shard(len(self.images), self.seed, epoch, self.steps_per_epoch, self.batch,
                         self.rank, self.world)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.shard(epoch).to(self.device, non_blocking=True)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch]
            # Seeded without the rank: every rank draws the global batch's numbers (two_views).
            self.gen.manual_seed(step_seed(self.seed, epoch, step, 0))
            yield two_views(self.images[idx], self.aug, self.gen, self.dtype, self.channels_last,
                            (self.rank, self.world))


class LabelledSource:
    """Fine-tuning and evaluation: one view (augmented when training) and its labels."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, batch_size: int, size: int,
                 device, train_aug: ViewAugment | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, dtype=torch.float32, channels_last: bool = False):
        self.images = to_device_images(images, device)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).to(device)
        self.batch, self.size, self.aug, self.seed = batch_size, size, train_aug, seed
        self.device, self.rank, self.world = torch.device(device), rank, world_size
        self.dtype, self.channels_last = dtype, channels_last
        self.steps_per_epoch = labelled_steps(len(self.images), batch_size, world_size,
                                              train_aug is not None)
        self.gen = torch.Generator(device=self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = labelled_shard(len(self.images), self.seed, epoch, self.rank, self.world,
                               self.aug is not None).to(self.device, non_blocking=True)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch]
            if len(idx) == 0:  # a rank whose shard is one image short ends one step early
                return
            yield self.inputs(self.images[idx], epoch, step), self.targets[idx]

    def inputs(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if self.aug is None:
            return eval_view(images, self.size, self.dtype, self.channels_last)
        # As TwoViewSource: the global batch's numbers, this rank's rows (so N processes
        # augment every image as one process would).
        self.gen.manual_seed(step_seed(self.seed, epoch, step, 0, 1))
        p = sample_params(images.shape[0] * self.world, self.aug, self.gen,
                          images.device).rows(self.rank, self.world)
        return normalize(render(images, p, self.aug, self.size), self.dtype, self.channels_last)
