"""Deterministic, stratified, group-aware splits and nested label fractions.

Both work on groups (patients, duplicate clusters), never on single images, so no group
straddles a boundary. Per class, the groups are put in a random order drawn from the seed
and the class name alone, then taken from the front: the same data and seed always give the
same split, and a smaller fraction is always a prefix of a larger one (1% within 10% within
50%), which makes low-label results comparable.
"""
from __future__ import annotations

import math
import zlib
from collections import Counter, defaultdict

import numpy as np


def _groups_by_class(indices, labels, groups) -> dict[str, list[list[int]]]:
    """class -> list of groups (each a list of image indices), groups in sorted order."""
    members: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        members[groups[i]].append(i)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for g in sorted(members):
        # A group's class is its most common label (ties: alphabetical), so groups with
        # mixed labels stay whole instead of being cut.
        counts = Counter("" if labels[i] is None else labels[i] for i in members[g])
        label = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_class[label].append(members[g])
    return by_class


def _shuffled(items: list, seed: int, cls: str, salt: int) -> list:
    rng = np.random.default_rng([seed, zlib.crc32(cls.encode()), salt])
    return [items[j] for j in rng.permutation(len(items))]


def split_test(labels: list, groups: list, test_fraction: float, seed: int,
               fixed: list | None = None) -> np.ndarray:
    """Boolean mask: True for test images. `fixed` (train/test/None per image) wins where set,
    for the image's whole group: a patient with one image fixed to train has all of them in
    train. A group fixed to both sides is refused (ValueError naming it)."""
    n = len(labels)
    is_test = np.zeros(n, dtype=bool)
    free = list(range(n))
    if fixed is not None:
        side = _fixed_sides(groups, fixed)
        is_test[:] = [side.get(g) == "test" for g in groups]
        free = [i for i in range(n) if groups[i] not in side]
    for cls, cls_groups in _groups_by_class(free, labels, groups).items():
        target = round(test_fraction * sum(len(g) for g in cls_groups))
        taken = 0
        for g in _shuffled(cls_groups, seed, cls, salt=0):
            if taken >= target:
                break
            is_test[g] = True
            taken += len(g)
    return is_test


def _fixed_sides(groups: list, fixed: list) -> dict:
    """group -> 'train' or 'test' for every group with at least one fixed image."""
    sides: dict = defaultdict(set)
    for g, f in zip(groups, fixed):
        if f is not None:
            sides[g].add(f)
    both = sorted(str(g) for g, s in sides.items() if len(s) > 1)
    if both:
        raise ValueError(f"{len(both)} group(s) have images fixed to both train and test "
                         f"(first: {', '.join(both[:3])}); a patient's images must stay on one "
                         "side of the split")
    return {g: s.pop() for g, s in sides.items()}


def fraction_subset(train_idx, labels: list, groups: list, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified, group-aware, nested subset holding `fraction` of each class.

    Every class keeps at least one group, so a 1% subset of a small set still sees each class.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    chosen: list[int] = []
    for cls, cls_groups in sorted(_groups_by_class(list(train_idx), labels, groups).items()):
        target = max(1, math.ceil(fraction * sum(len(g) for g in cls_groups)))
        taken = 0
        for g in _shuffled(cls_groups, seed, cls, salt=1):
            if taken >= target:
                break
            chosen += g
            taken += len(g)
    return np.array(sorted(chosen), dtype=np.int64)
