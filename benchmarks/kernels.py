"""Fused kernels vs their PyTorch baselines, side by side in one run.

    python benchmarks/kernels.py [--device cuda|cpu] [--arch resnet50] [--json PATH]

EMA over a resnet + projector/predictor parameter set: Triton (one launch over FlatParams)
vs torch._foreach_lerp_ vs the per-parameter Python loop (and, for reference, torch's own
lerp_ over the same flat buffer). Cross loss fwd+bwd at D=128: Triton vs the eager reference
vs torch.compile(reference). Every row gets median ms, achieved GB/s, the fraction of the
measured copy bandwidth, and speedups; the targets are checked and reported, never asserted.
On CPU Triton rows are skipped unless TRITON_INTERPRET=1 (then they run, interpreted: the
numbers say nothing about speed). Medians use triton.testing.do_bench on CUDA (it flushes
L2 between runs), a synchronising perf_counter median elsewhere; all warm-up is untimed.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import sstl.kernels as K
from sstl.benchmarks.common import machine, sync
from sstl.engine.models import ARCHS, backbone, mlp
from sstl.kernels.loss import CrossLoss

TAU = 0.996
LOSS_D = 128
LOSS_BATCHES = (256, 512)
TARGETS = {"ema_frac_copy": 0.8, "ema_vs_foreach": 1.5, "loss_vs_eager": 3.0}


def _model(arch: str) -> nn.Module:
    """Backbone + projector + predictor, as the method builds them (the EMA covers them all)."""
    feat = ARCHS[arch]
    return nn.Sequential(backbone(arch), mlp(feat, 512, 128), mlp(128, 4096, 128))


def _median_ms(fn, device: torch.device, reps: int) -> float:
    fn(), fn()  # warm-up: Triton/inductor compilation, allocator, caches
    if device.type == "cuda" and K.triton_available(device):
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _row(group, name, ms, nbytes, copy_gbps, **extra) -> dict:
    gbps = nbytes / ms / 1e6
    return {"group": group, "name": name, "ms": ms, "bytes": nbytes, "gbps": gbps,
            "frac_copy": gbps / copy_gbps, "skipped": None, **extra}


def _skipped(group, name, reason) -> dict:
    return {"group": group, "name": name, "ms": None, "gbps": None, "frac_copy": None,
            "speedup": {}, "skipped": reason}


def _copy_gbps(n: int, device, reps) -> float:
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return 8 * n / _median_ms(lambda: dst.copy_(src), device, reps) / 1e6  # read + write


def _ema_rows(fo, ft, device, reps, copy_gbps, skip) -> list[dict]:
    n, start = fo.flat.numel(), ft.flat.clone()
    K.ema_reference_(ft, fo, TAU)
    expected = ft.flat.clone()
    meta = {"elements": n, "tensors": len(fo.tensors)}
    variants = {"triton": lambda: K.ema_triton_(ft, fo, TAU),  # one launch
                "foreach_lerp": lambda: K.ema_reference_(ft, fo, TAU),
                "loop": lambda: K.ema_loop_(ft, fo, TAU),
                "flat lerp_": lambda: ft.flat.lerp_(fo.flat, 1 - TAU)}  # torch, one launch
    rows = []
    for name, fn in variants.items():
        if name == "triton" and skip:
            rows.append(_skipped("ema", name, skip))
            continue
        ft.flat.copy_(start)
        fn()
        err = (ft.flat - expected).abs().max().item()
        rows.append(_row("ema", name, _median_ms(fn, device, reps), 12 * n, copy_gbps,
                         max_abs_err=err, **meta))
    return _speedups(rows, ["foreach_lerp", "loop"])


def _loss_rows(B, device, reps, copy_gbps, skip) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(B)
    p1, p2, y2 = torch.randn(3, B, LOSS_D, device=device, generator=g).unbind(0)
    p1, p2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    compiled = torch.compile(K.cross_loss_reference, dynamic=False)
    variants = {"triton": lambda a, b, y: CrossLoss.apply(a, b, y, True),  # K.cross_loss, eager
                "eager": K.cross_loss_reference,
                "compiled": compiled}  # torch.compile(reference)
    ref = torch.autograd.grad(K.cross_loss_reference(p1, p2, y2), (p1, p2))
    nbytes = 8 * B * LOSS_D * p1.element_size()  # fwd reads 3; bwd reads 3, writes 2
    rows = []
    for name, loss_fn in variants.items():
        if name == "triton" and skip:
            rows.append(_skipped(f"loss B={B}", name, skip))
            continue

        def fwd_bwd(loss_fn=loss_fn):
            return torch.autograd.grad(loss_fn(p1, p2, y2), (p1, p2))  # no .grad accumulation

        err = max((a - b).abs().max().item() for a, b in zip(fwd_bwd(), ref))
        rows.append(_row(f"loss B={B}", name, _median_ms(fwd_bwd, device, reps), nbytes,
                         copy_gbps, max_abs_err=err, batch=B, dim=LOSS_D))
    return _speedups(rows, ["eager", "compiled"])


def _speedups(rows, baselines) -> list[dict]:
    times = {r["name"]: r["ms"] for r in rows}
    for r in rows:
        r["speedup"] = {b: times[b] / r["ms"] for b in baselines
                        if r["ms"] and times.get(b) and b != r["name"]}
    return rows


def _meta(device: torch.device, arch: str) -> dict:
    m = machine()
    name = m["gpu"] if device.type == "cuda" else platform.processor() or platform.machine()
    return {**m, "device": str(device), "device_name": name, "arch": arch,
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def _targets(rows, interpreted: bool) -> list[dict]:
    def get(group, name):
        return next(r for r in rows if r["group"] == group and r["name"] == name)

    ema = get("ema", "triton")
    checks = [("EMA triton / copy bandwidth", ema["frac_copy"], TARGETS["ema_frac_copy"]),
              ("EMA triton vs _foreach_lerp_", ema["speedup"].get("foreach_lerp"),
               TARGETS["ema_vs_foreach"])]
    for B in LOSS_BATCHES:
        loss = get(f"loss B={B}", "triton")
        checks.append((f"loss B={B} fwd+bwd triton vs eager", loss["speedup"].get("eager"),
                       TARGETS["loss_vs_eager"]))
    # Interpreted Triton timings measure the interpreter, so no target applies to them.
    return [{"name": n, "value": v, "target": t,
             "met": None if v is None or interpreted else v >= t} for n, v, t in checks]


def run(device: str = "cuda", json_path=None, arch: str | None = None) -> dict:
    """Benchmark everything on `device`; returns (and optionally writes) the results dict."""
    device = torch.device(device)
    arch = arch or ("resnet50" if device.type == "cuda" else "resnet18")
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    reps = 2 if interpreted else 10  # (CUDA: do_bench picks its own count)
    skip = None if K.triton_available(device) else (
        "Triton cannot run here: needs CUDA, or TRITON_INTERPRET=1 on CPU (interpreted, so "
        "its timings are not performance numbers)")
    online = _model(arch).to(device)
    target = copy.deepcopy(online).requires_grad_(False)
    fo, ft = K.FlatParams(online.parameters()), K.FlatParams(target.parameters())
    # Copy bandwidth over the EMA's working set (far beyond L2): the memory-bound ceiling.
    copy_gbps = _copy_gbps(fo.flat.numel(), device, reps)
    rows = _ema_rows(fo, ft, device, reps, copy_gbps, skip)
    for B in LOSS_BATCHES:
        rows += _loss_rows(B, device, reps, copy_gbps, skip)
    result = {"meta": _meta(device, arch), "copy_gbps": copy_gbps, "rows": rows,
              "targets": _targets(rows, interpreted)}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_report(result: dict) -> None:
    console, meta = Console(), result["meta"]
    console.print(f"[bold]{meta['device_name']}[/] ({meta['device']}), torch {meta['torch']}, "
                  f"triton {meta['triton']}, {meta['arch']}, copy {result['copy_gbps']:.0f} GB/s,"
                  f" git {meta['git_sha']}, {meta['host']}, {meta['time']}")
    table = Table("what", "variant", "median ms", "GB/s", "% copy", "speedup", "max err")
    for r in result["rows"]:
        speed = ", ".join(f"{v:.2f}x {k}" for k, v in r["speedup"].items())
        table.add_row(r["group"], r["name"], _fmt(r["ms"], ".4f"), _fmt(r["gbps"], ".1f"),
                      _fmt(r["frac_copy"] and 100 * r["frac_copy"], ".1f"),
                      "skipped" if r["skipped"] else speed, _fmt(r.get("max_abs_err"), ".1e"))
    console.print(table)
    for reason in sorted({r["skipped"] for r in result["rows"] if r["skipped"]}):
        console.print(f"  skipped: {reason}")
    for t in result["targets"]:
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "[yellow]n/a[/]"}[t["met"]]
        console.print(f"  {t['name']}: {_fmt(t['value'], '.2f')} (target >= {t['target']}) {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="resnet50 on CUDA, resnet18 on CPU")
    parser.add_argument("--json", default=None,
                        help="default: benchmarks/results/kernels-<device>.json")
    args = parser.parse_args()
    json_path = args.json or Path(__file__).parent / "results" / f"kernels-{args.device}.json"
    print_report(run(args.device, json_path, args.arch))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
