"""SSL training-step throughput: sstl's step against the peer baseline, rung by rung.

Rungs, side by side in one run on the same data and model:
  peer       DataLoader (persistent workers) + torchvision, eager fp32, plain loss, EMA loop
             (benchmarks/peer.py says what it models)
  peer+bf16  ... with bf16 autocast, as solo-learn's configs run it (GPU)
  eager      sstl's step with the views made on the device; reference loss, foreach EMA
  +fused     ... with the Triton loss and one-launch flat EMA
  +channels_last, +bf16, +compile   ... each optimisation on its own on top of `eager`
  sstl       the step exactly as `sstl pretrain` runs it on this device (all of the above
             and CUDA graphs on CUDA; fp32 eager channels_last on a CPU)
Each rung: warm-up (compilation included) outside the timed region, then the median over
repeats of synchronised step times. Reported: ms/step, images/s (source images: each makes
two views), peak memory, and model FLOP utilisation (matmul/conv FLOPs counted per image,
online forward + backward on two views and target forward on one, over the device's peak).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from sstl.engine.config import (AugmentConfig, DataConfig, PretrainConfig, Runtime, check,
                               pick_device, resolve)
from sstl.engine.data.backends import ssl_source
from sstl.engine.data.dataset import load_dataset
from sstl.engine import accel
from sstl.engine.loop import stepper
from sstl.engine.methods import METHODS
from sstl.engine.pretrain import build_method, build_trainer

from sstl.kernels import use_triton

from .common import forward_flops, machine, median_seconds, peak_flops, sync, write_json
from .peer import MODELS as PEER_MODELS
from .peer import peer_loader, peer_step


@dataclass(frozen=True)
class Rung:
    name: str
    peer: bool = False  # the peer baseline's data path and step
    fused: bool = False  # Triton loss + flat EMA (else the plain-ops reference path)
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    graphs: bool = False  # the whole step replayed as a CUDA graph (engine/accel.py)
    # Every choice left to `auto`, resolved as `sstl pretrain` resolves it (the fields above
    # are then filled from what it chose): the step a user gets.
    as_pretrain: bool = False


RUNGS = [Rung("peer", peer=True), Rung("peer+bf16", peer=True, bf16=True), Rung("eager"),
         Rung("+fused", fused=True), Rung("+channels_last", channels_last=True),
         Rung("+bf16", bf16=True), Rung("+compile", compile=True),
         Rung("sstl", as_pretrain=True)]


def skip_reason(r: Rung, device: str, cpu_all: bool) -> str | None:
    if device.startswith("cuda") or cpu_all or r.name == "sstl":
        return None
    if r.bf16:
        return "GPU rung (--cpu-all)"
    if r.compile:
        return "slow to compile on CPU (--cpu-all)"
    if r.fused:
        return "Triton: CUDA only"
    return None


def ssl_flops_per_image(method, size: int, device) -> float:
    """Online fwd+bwd (3x fwd) on two views plus the target's fwd (Cross: one view), per image."""
    was = method.training
    method.eval()
    x = torch.randn(2, 3, size, size, device=device)
    online = torch.nn.Sequential(method.backbone, method.projector,
                                 getattr(method, "predictor", torch.nn.Identity()))
    f_online = forward_flops(online, x) / 2
    target = getattr(method, "target", None)
    f_target = forward_flops(target, x) / 2 if target is not None else 0.0
    method.train(was)
    return 3 * 2 * f_online + f_target


def rung_setup(cfg: PretrainConfig, rung: Rung):
    """(config, resolved runtime, kernels mode) of a rung: its own choices, or pretrain's."""
    if rung.as_pretrain:
        cfg = dataclasses.replace(cfg, runtime=Runtime(device=cfg.runtime.device))
        return cfg, resolve(cfg.runtime, cfg.batch_size, METHODS[cfg.method].cls.views), "auto"
    rt = dataclasses.replace(cfg.runtime, compile=rung.compile, cuda_graphs=rung.graphs,
                             precision="bf16" if rung.bf16 else "fp32", backend="torch")
    res = dataclasses.replace(resolve(rt, cfg.batch_size), channels_last=rung.channels_last)
    return dataclasses.replace(cfg, runtime=rt), res, "auto" if rung.fused else "reference"


def measure(rung: Rung, cfg: PretrainConfig, images, paths, steps, warmup, repeats) -> dict:
    torch._dynamo.reset()
    cfg, res, os.environ["SSTL_KERNELS"] = rung_setup(cfg, rung)
    method = build_method(cfg, res)
    t = build_trainer(cfg, res, method, total_steps=10 ** 6)
    if rung.peer:
        loader = peer_loader(paths, cfg.augment, res.per_rank_batch,
                             pin_memory=res.device.startswith("cuda"))
        batches = (b for _ in itertools.count() for b in loader)

        def one():
            v1, v2 = next(batches)
            peer_step(method, t.opt, v1.to(res.device, non_blocking=True),
                      v2.to(res.device, non_blocking=True), cfg.settings.tau,
                      autocast=res.autocast if rung.bf16 else None)
    else:
        source = ssl_source(method.views, images, cfg, res)
        method.attach(len(images), cfg.runtime.seed)
        batches = itertools.chain.from_iterable(source.epoch(e) for e in itertools.count())
        step, step_fn = itertools.count(), stepper(t)  # graphed only where rung.graphs

        def one():
            step_fn(next(batches), next(step))
    if res.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(res.device)
    for _ in range(max(warmup, accel.WARMUP + 2 if t.graphs else 0)):  # + capture, a replay
        one()
    sync(res.device)
    sec, all_sec = median_seconds(one, res.device, steps, repeats)
    peak_mem = torch.cuda.max_memory_allocated(res.device) if res.device.startswith("cuda") else None
    if rung.peer:  # end the persistent workers: they must not steal the next rung's CPU
        batches.close()
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
    if rung.as_pretrain:  # what pretrain chose, in the other rungs' columns
        rung = dataclasses.replace(rung, fused=use_triton(res.device), bf16=res.dtype != "float32",
                                   channels_last=res.channels_last, compile=res.compile,
                                   graphs=t.graphs)
    os.environ.pop("SSTL_KERNELS", None)
    return {"rung": rung.name, **dataclasses.asdict(rung), "backend": res.backend,
            "models": PEER_MODELS if rung.peer else "sstl's own step",
            "ms_per_step": sec * 1e3,
            "images_per_s": res.per_rank_batch / sec, "repeats_ms": [s * 1e3 for s in all_sec],
            "peak_mem_gb": peak_mem / 1e9 if peak_mem is not None else None}


def run(data: str | None = None, device: str = "auto", arch: str = "resnet50",
        batch_size: int | None = None, view_size: int = 112, steps: int | None = None,
        warmup: int | None = None, repeats: int = 3, cpu_all: bool = False,
        json_path=None, only: list[str] | None = None) -> dict:
    on_gpu = pick_device(device) != "cpu"
    batch_size = batch_size or (256 if on_gpu else 32)
    steps, warmup = steps or (20 if on_gpu else 2), warmup or (5 if on_gpu else 1)
    cfg = check(PretrainConfig(data=DataConfig(path=data), runtime=Runtime(device=device,
                                                                           backend="torch"),
                               arch=arch, init="random", batch_size=batch_size,
                               augment=AugmentConfig(size=view_size)))
    ds = load_dataset(cfg.data, log=lambda m: None)
    images, paths = ds.images[ds.train_idx], [ds.records[i].path for i in ds.train_idx]
    # Small sets (the demo's 204 images) repeat until an epoch holds the warm-up and the timed
    # steps, so no rung's timing crosses an epoch boundary it would not cross on real data.
    copies = -(-(warmup + steps * repeats + 1) * batch_size // len(paths))
    images, paths = np.concatenate([images] * copies), paths * copies
    res = resolve(cfg.runtime, cfg.batch_size)
    dev = res.device
    flops = ssl_flops_per_image(build_method(cfg, res), view_size, dev)
    peak, peak_src = peak_flops(dev)
    rows = []
    for r in RUNGS:
        if only and r.name not in only:
            continue
        why = skip_reason(r, dev, cpu_all)
        row = {"rung": r.name, "skipped": why} if why else measure(r, cfg, images, paths, steps,
                                                                      warmup, repeats)
        if not why:
            row["mfu"] = row["images_per_s"] * flops / peak
        rows.append(row)
    # Ratios against the fastest peer rung measured: the strongest honest baseline.
    peers = [r for r in rows if r.get("peer") and "images_per_s" in r]
    base = max(peers, key=lambda r: r["images_per_s"]) if peers else None
    for r in rows:
        if base and "images_per_s" in r:
            r["x_peer"] = r["images_per_s"] / base["images_per_s"]
            r["peer_rung"] = base["rung"]
    result = {"bench": "step", "machine": machine(), "device": dev, "arch": arch,
              "batch_size": batch_size, "view_size": view_size, "steps": steps,
              "warmup": warmup, "repeats": repeats, "flops_per_image": flops,
              "peak_flops": peak, "peak_source": peak_src, "data": "synthetic" if ds.synthetic
              else str(ds.root), "n_images": len(images), "rows": rows,
              "targets": targets(rows, dev, arch, view_size, batch_size)}
    write_json(result, json_path)
    return result


def targets(rows, device, arch, view_size, batch) -> list[dict]:
    """The issue's targets, reported (never asserted): only meaningful on the named setup."""
    by = {r["rung"]: r for r in rows if "images_per_s" in r}
    out = []
    if "sstl" in by and device.startswith("cuda") and arch == "resnet50" and view_size == 112:
        out.append({"target": "sstl >= 12,000 images/s (resnet50, 112, bf16)",
                    "value": by["sstl"]["images_per_s"], "met": by["sstl"]["images_per_s"] >= 12000})
    if "sstl" in by and "x_peer" in by["sstl"]:
        ratio, need = by["sstl"]["x_peer"], 3.0 if device.startswith("cuda") else 1.0
        out.append({"target": f"sstl >= {need:g}x the fastest peer ({by['sstl']['peer_rung']})",
                    "value": ratio, "met": ratio >= need})
    return out
