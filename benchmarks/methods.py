"""Images/s of every method's training step, side by side, as `sstl pretrain` builds it.

One row per method of Table 2 (resnet50, batch 256, two 112-pixel views, bf16 and
torch.compile and CUDA graphs on a GPU): the step `engine.loop.fit` runs, on batches from the data
path pretraining uses, timed after a warm-up that includes compilation (reported apart).
    python -m sstl.benchmarks.methods --device cuda --json benchmarks/results/methods-<gpu>.json
    ... --graphs both    each method without and with CUDA graphs, side by side
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from sstl.engine.config import (AugmentConfig, PretrainConfig, Runtime, check, pick_device,
                                 resolve)
from sstl.engine.data.backends import ssl_source
from sstl.engine.data.dataset import load_dataset
from sstl.engine import accel
from sstl.engine.loop import stepper
from sstl.engine.methods import METHODS
from sstl.engine.pretrain import build_method, build_trainer

from .common import machine, median_seconds, sync, write_json


def build_step(method: str, images, device: str, arch: str, batch: int, size: int,
               graphs: bool | None = None):
    """The step `sstl pretrain` runs for `method` (graphed where fit would graph it), fed by
    pretraining's data path; returns (trainer, resolved runtime, run-one-step function)."""
    torch._dynamo.reset()
    cfg = check(PretrainConfig(method=method, arch=arch, init="random", batch_size=batch,
                               augment=AugmentConfig(size=size),
                               runtime=Runtime(device=device, backend="torch",
                                               cuda_graphs=graphs)))
    res = resolve(cfg.runtime, cfg.batch_size)
    m = build_method(cfg, res)
    t = build_trainer(cfg, res, m, total_steps=10 ** 6)
    source = ssl_source(m.views, images, cfg, res)
    m.attach(len(images), cfg.runtime.seed)  # PIRL sizes its memory bank; others ignore it
    batches = itertools.chain.from_iterable(source.epoch(e) for e in itertools.count())
    step, one = itertools.count(), stepper(t)
    return t, res, lambda: one(next(batches), next(step))


def measure(method: str, images, device: str, arch: str, batch: int, size: int, steps: int,
            warmup: int, repeats: int, graphs: bool | None = None) -> dict:
    t, res, one = build_step(method, images, device, arch, batch, size, graphs)
    t0 = time.perf_counter()
    for _ in range(max(warmup, accel.WARMUP + 2 if t.graphs else 0)):  # + capture, one replay
        one()
    sync(res.device)
    warm = time.perf_counter() - t0
    sec, all_sec = median_seconds(one, res.device, steps, repeats)
    return {"method": method, "graphs": t.graphs, "images_per_s": batch / sec,
            "ms_per_step": sec * 1e3, "repeats_ms": [s * 1e3 for s in all_sec],
            "warmup_s": warm, "compile": res.compile, "dtype": res.dtype}


def demo_images(batch: int) -> np.ndarray:
    """The embedded demo set's training images, repeated to at least two batches."""
    ds = load_dataset(PretrainConfig().data, log=lambda m: None)
    images = ds.images[ds.train_idx]
    return np.concatenate([images] * -(-2 * batch // len(images)))


def run(device: str = "auto", arch: str = "resnet50", batch: int | None = None, size: int = 112,
        steps: int | None = None, warmup: int | None = None, repeats: int = 3,
        json_path=None, methods=None, graphs=(None,)) -> dict:
    """`graphs`: the --cuda-graphs settings to measure each method with (None: the default)."""
    on_gpu = pick_device(device) != "cpu"
    batch = batch or (256 if on_gpu else 32)
    steps, warmup = steps or (20 if on_gpu else 2), warmup or (5 if on_gpu else 1)
    images = demo_images(batch)
    rows = []
    for name in methods or METHODS:
        for g in graphs:
            rows.append(measure(name, images, device, arch, batch, size, steps, warmup, repeats, g))
            print(_line(rows[-1]), flush=True)  # a run cut short still shows what it measured
    result = {"bench": "methods", "machine": machine(), "arch": arch, "batch_size": batch,
              "view_size": size, "steps": steps, "warmup": warmup, "repeats": repeats,
              "rows": rows}
    write_json(result, json_path)
    return result


def _line(row: dict) -> str:
    return (f"{row['method']:14s} graphs {str(row['graphs']):5s} {row['images_per_s']:9,.0f} "
            f"img/s  {row['ms_per_step']:7.1f} ms/step  warm-up {row['warmup_s']:5.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--json", default=None)
    p.add_argument("--methods", nargs="*", default=None, help="default: every method")
    p.add_argument("--graphs", choices=["default", "both"], default="default",
                   help="both: each method without and with CUDA graphs, side by side")
    a = p.parse_args()
    run(a.device, a.arch, a.batch, a.size, json_path=a.json, methods=a.methods,
        graphs=(False, True) if a.graphs == "both" else (None,))


if __name__ == "__main__":
    main()
