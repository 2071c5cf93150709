"""The embedded default data: SYNTHETIC radiograph-like images, drawn procedurally.

For a first run on a machine without data (and for users without ../shared). Every image is
a chest silhouette (soft tissue, two dark lung fields, spine, ribs, heart shadow, noise);
the four classes differ in visible structure, standing in for the real classes:
  Normal               clear lung fields
  COVID                patchy ground-glass opacities, bilateral, peripheral, lower zones
  Viral Pneumonia      diffuse interstitial streaks across both lungs
  Bacterial Pneumonia  one dense lobar consolidation in one lung
These are NOT X-rays and nothing learnt on them means anything clinically; they exist so the
whole pipeline can be run and seen to learn in a minute on a CPU.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import temp_path
from .cache import default_cache_dir

CLASSES = ("Normal", "COVID", "Viral Pneumonia", "Bacterial Pneumonia")
PER_CLASS = 64
SIZE = 224
VERSION = 1


def _ellipse(yy, xx, cy, cx, ry, rx, soft=0.08):
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.clip((1.0 - d) / soft, 0.0, 1.0)


def draw(cls: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:1:size * 1j, 0:1:size * 1j]
    j = lambda s: rng.normal(0, s)  # noqa: E731 - small jitter of every landmark
    img = 0.08 + 0.55 * _ellipse(yy, xx, 0.55 + j(0.02), 0.5 + j(0.02), 0.55, 0.46 + j(0.02), 0.3)
    lungs = [_ellipse(yy, xx, 0.47 + j(0.02), cx + j(0.015), 0.30 + j(0.02), 0.15 + j(0.01), 0.25)
             for cx in (0.32, 0.68)]
    lung = np.maximum(*lungs)
    img -= 0.38 * lung
    for k in range(8):  # ribs: bright arcs crossing the lung fields
        y0 = 0.22 + 0.07 * k + j(0.005)
        rib = np.exp(-(((yy - y0 - 0.12 * (xx - 0.5) ** 2 * 4) / 0.012) ** 2))
        img += 0.10 * rib * (0.3 + lung)
    img += 0.35 * np.exp(-(((xx - 0.5 - j(0.005)) / 0.035) ** 2)) * (yy > 0.1)  # spine
    img += 0.30 * _ellipse(yy, xx, 0.62 + j(0.02), 0.56 + j(0.02), 0.16, 0.14, 0.6)  # heart
    if cls == "COVID":
        for _ in range(rng.integers(4, 8)):
            side = rng.choice([0.22, 0.78])
            img += 0.22 * _ellipse(yy, xx, rng.uniform(0.5, 0.72), side + j(0.04),
                                   rng.uniform(0.05, 0.1), rng.uniform(0.04, 0.08), 1.0) * lung
    elif cls == "Viral Pneumonia":
        angle = rng.uniform(0, np.pi, size=6)
        streaks = sum(np.abs(np.sin(40 * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 6)))
                      for a in angle) / 6
        img += 0.25 * (streaks > 0.8) * lung
    elif cls == "Bacterial Pneumonia":
        cx = rng.choice([0.32, 0.68]) + j(0.02)
        img += 0.45 * _ellipse(yy, xx, rng.uniform(0.45, 0.65), cx, rng.uniform(0.1, 0.16),
                               rng.uniform(0.08, 0.12), 0.4) * lung
    img += rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def ensure_synthetic(folder: str | os.PathLike | None = None, per_class: int = PER_CLASS) -> Path:
    """Draw the set once (seeded, so identical everywhere) and return its folder.

    A larger `per_class` (benchmarks) needs its own `folder`: the default one is the demo set.
    """
    target = Path(folder) if folder else default_cache_dir() / f"synthetic-v{VERSION}"
    if (target / "manifest.csv").exists():
        return target
    # The cache's temporary naming (pid@host): a shared cache's sweep spares other hosts' draws.
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _draw_into(tmp, per_class)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "manifest.csv").exists():
            raise
        # else another process finished first: theirs is identical
    except BaseException:  # Ctrl-C mid-drawing: leave no half-drawn folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _draw_into(folder: Path, per_class: int) -> None:
    rows = []
    for c, cls in enumerate(CLASSES):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([VERSION, c, i])
            rel = f"{cls}/synthetic_{i:03d}.png"
            Image.fromarray(draw(cls, rng)).save(folder / rel)
            rows.append((rel, cls, f"synthetic:{cls}:{i}"))
    with open(folder / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "group"), *rows])
    (folder / "README.txt").write_text(__doc__)
