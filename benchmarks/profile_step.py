"""Where the GPU time of one training step goes: kernel time by kind, with and without graphs.

    python -m sstl.benchmarks.profile_step --method cross --json profile.json

Builds the step as `sstl pretrain` does (resnet50, batch 256, two 112-pixel views, bf16,
torch.compile; the data path's augmentation included), warms it up (compilation, capture),
then records `--steps` steps with torch.profiler and sums CUDA kernel time by kind: the
convolutions (cuDNN/CUTLASS), matrix products, Inductor's fused Triton kernels (BatchNorm,
ReLU, adds), the optimizer, the EMA and loss kernels, copies. Kernel time per step against
wall time per step says whether the step is launch-bound (gaps) or kernel-bound.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from .common import machine, sync, write_json

KINDS = (  # first match wins; names are lower-cased kernel names
    ("sgd", ("sgd",)),
    ("ema/loss (sstl Triton)", ("_ema", "_cross", "_cosine")),
    # before the convolutions: Inductor names its kernels after the ops they fuse, and
    # "convolution_backward" is often one of them
    ("fused elementwise/BN (Inductor)", ("triton_",)),
    ("convolution", ("conv", "cudnn", "xmma", "implicit", "wgrad", "dgrad", "fprop")),
    ("matmul", ("gemm", "cutlass", "nvjet", "cublas")),
    ("batchnorm (aten)", ("batch_norm", "bn_", "welford")),
    ("copy/fill", ("copy", "fill", "memcpy", "memset")),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def profile(method: str, graphs: bool, steps: int, batch: int = 256) -> dict:
    from . import methods

    t, _, one = methods.build_step(method, methods.demo_images(batch), "cuda", "resnet50",
                                   batch, 112, graphs)
    for _ in range(8):  # compilation, warm-up, capture
        one()
    sync("cuda")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        sync("cuda")
        wall = (time.perf_counter() - t0) / steps
    by_kind, count, top = defaultdict(float), 0, defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # a kernel, memcpy or memset
            ms = e.time_range.elapsed_us() / 1e3 / steps
            by_kind[kind(e.name)] += ms
            top[e.name[:90]] += ms
            count += 1
    kernel_ms = sum(by_kind.values())
    return {"method": method, "graphs": t.graphs, "wall_ms_per_step": wall * 1e3,
            "kernel_ms_per_step": kernel_ms, "kernels_per_step": count / steps,
            "images_per_s": batch / wall,
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="cross")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = [profile(a.method, g, a.steps) for g in (False, True)]
    for r in rows:
        print(f"{r['method']} graphs {r['graphs']}: wall {r['wall_ms_per_step']:.1f} ms, kernels "
              f"{r['kernel_ms_per_step']:.1f} ms ({r['kernels_per_step']:.0f} launches), "
              f"{r['images_per_s']:,.0f} img/s")
        for k, v in r["by_kind_ms"].items():
            print(f"    {k:34s} {v:7.2f} ms")
    for name, v in rows[0]["top_kernels_ms"].items():
        print(f"  {v:7.2f} ms  {name}")
    write_json({"bench": "profile_step", "machine": machine(), "rows": rows}, a.json)


if __name__ == "__main__":
    main()
