"""Two-view data throughput: the sstl paths against what users do today, on the same data.

Rows: DALI from the decoded cache, DALI from the image files, the torch path (TwoViewSource),
and the baseline: torchvision transforms (RandomResizedCrop, flip, GaussianBlur, ColorJitter)
on PIL images decoded from the files every time, in a DataLoader with one worker per CPU.
All rows use the same AugmentConfig. A row that cannot run here (DALI absent) is reported
as skipped, with the reason. Targets, reported and not asserted: on a CPU the best sstl path
at 2x the baseline or more; on a GPU 30,000 two-view samples/s or more from the cache.

Each row: one long epoch (the data is repeated so that no epoch boundary falls inside the
measurement), `warmup` batches untimed, then `repeats` windows of `steps` batches, each
closed by a device synchronisation; the median window counts. CPU time is this process's
plus its children's (the DataLoader workers), per sample.

    python benchmarks/data.py --device cpu            # small defaults on a CPU
    python benchmarks/data.py --json benchmarks/results/data-h100.json
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sstl.engine.config import AugmentConfig, DataConfig, auto_precision, pick_device, save_json
from sstl.engine.data import dali
from sstl.engine.data.dataset import load_dataset
from sstl.engine.data.loader import TwoViewSource
from sstl.benchmarks.common import machine as common_machine
from sstl.benchmarks.peer import TwoViewFiles

CPU_TARGET_RATIO = 2.0  # best sstl path vs the DataLoader baseline, on a CPU
GPU_TARGET_SPS = 30_000  # two-view samples/s from the cache, on a GPU


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its children, exited or alive. getrusage
    counts children only once reaped, so live workers are read from /proc (Linux)."""
    me, live = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing
            continue
        if int(fields[1]) == me:  # ppid; then utime and stime, in clock ticks
            live += int(fields[11]) + int(fields[12])
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + done.ru_utime + done.ru_stime + live / os.sysconf("SC_CLK_TCK")


def measure(batches, batch: int, steps: int, warmup: int, repeats: int, sync) -> dict:
    for _ in range(warmup):
        next(batches)
    sync()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(steps):
            next(batches)
        sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(cpu_seconds() - c0)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"samples_per_s": steps * batch / wall,
            "cpu_ms_per_sample": 1e3 * cpu / (steps * batch), "window_s": walls, "cpu_s": cpus}


def machine(device: torch.device) -> dict:
    """The common record, plus what makes CPU data-path numbers readable (load, threads)."""
    m = common_machine()
    name = m["gpu"] if device.type == "cuda" else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    return {**m, "device": str(device), "device_name": name, "cpus": len(os.sched_getaffinity(0)),
            "load_avg_1min": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}


def run(data: str | None = None, device: str = "auto", batch_size: int | None = None,
        view_size: int = 112, steps: int | None = None, json_path: str | None = None,
        repeats: int = 5, warmup: int = 2, log=print) -> dict:
    """Measure every row; batch_size/steps default to 256/30 on a GPU, 64/8 on a CPU."""
    dev = torch.device(pick_device(device))  # as training runs decide it
    gpu = dev.type == "cuda"
    info = machine(dev)  # before the rows: the load average is then other work's, not ours
    batch, steps = batch_size or (256 if gpu else 64), steps or (30 if gpu else 8)
    # As training runs: --precision auto's dtype; channels_last on both devices (Resolved).
    dtype = torch.bfloat16 if auto_precision(str(dev)) == "bf16" else torch.float32
    channels_last = True
    aug = AugmentConfig(size=view_size)
    ds = load_dataset(DataConfig(path=data), log=lambda m: None)
    copies = math.ceil((warmup + repeats * steps) * batch / len(ds.records))
    images = np.concatenate([np.asarray(ds.images)] * copies)
    files = [r.path for r in ds.records] * copies
    sync = (lambda: torch.cuda.synchronize(dev)) if gpu else (lambda: None)
    timing = dict(batch=batch, steps=steps, warmup=warmup, repeats=repeats, sync=sync)

    def sstl_source(make):
        return lambda: iter(make().epoch(0))

    def baseline():
        workers = len(os.sched_getaffinity(0))
        loader = torch.utils.data.DataLoader(
            TwoViewFiles(files, aug), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=gpu, persistent_workers=True, prefetch_factor=2)
        return (tuple(v.to(dev, non_blocking=True) for v in views) for views in loader)

    rows = {
        "DALI, cache": sstl_source(lambda: dali.DaliTwoViewSource(
            images, aug, batch, 0, dev, dtype=dtype, channels_last=channels_last,
            cache_size=images.shape[-1])),
        "DALI, files": sstl_source(lambda: dali.DaliTwoViewSource(
            files, aug, batch, 0, dev, dtype=dtype, channels_last=channels_last,
            cache_size=images.shape[-1])),
        "torch path": sstl_source(lambda: TwoViewSource(
            images, aug, batch, 0, dev, dtype=dtype, channels_last=channels_last)),
        "DataLoader + torchvision": baseline,
    }
    results = {}
    for name, make in rows.items():
        if name.startswith("DALI") and dali.IMPORT_ERROR is not None:
            results[name] = {"skipped": f"DALI not importable: {dali.IMPORT_ERROR}"}
        else:
            log(f"measuring {name} ...")
            results[name] = measure(make(), **timing)
            gc.collect()  # the row's pipeline threads or workers go before the next row starts
    report = {"machine": info, "data": str(ds.root), "synthetic": ds.synthetic,
              "images": len(ds.records), "batch_size": batch, "view_size": view_size,
              "steps": steps, "repeats": repeats, "warmup": warmup, "dtype": str(dtype),
              "channels_last": channels_last, "rows": results}
    base = results["DataLoader + torchvision"]["samples_per_s"]
    for row in results.values():
        if "samples_per_s" in row:
            row["vs_baseline"] = row["samples_per_s"] / base
    report["targets"] = targets(results, gpu)
    if json_path:
        save_json(report, Path(json_path))
    return report


def targets(rows: dict, gpu: bool) -> dict:
    """The issue's goals, reported beside what was measured (never asserted)."""
    if gpu:
        # The lent GPUs have no DALI: the torch path is reported against the same bar.
        out = {}
        for name, key in (("DALI, cache", "dali_cache_samples_per_s"),
                          ("torch path", "torch_path_samples_per_s")):
            got = rows[name].get("samples_per_s")
            out[key] = {"target": GPU_TARGET_SPS, "measured": got,
                        "met": None if got is None else got >= GPU_TARGET_SPS}
        return out
    best = max(r["vs_baseline"] for name, r in rows.items()
               if "vs_baseline" in r and not name.startswith("DataLoader"))
    return {"best_sstl_vs_baseline": {"target": CPU_TARGET_RATIO, "measured": best,
                                      "met": best >= CPU_TARGET_RATIO}}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["machine"]
    table = Table(title=f"two-view data paths on {m['device_name']} - batch "
                        f"{report['batch_size']}, {report['view_size']}px views, median of "
                        f"{report['repeats']}x{report['steps']} steps")
    for col in ("path", "samples/s", "CPU ms/sample", "x baseline", "note"):
        table.add_column(col, justify="left" if col in ("path", "note") else "right")
    for name, r in report["rows"].items():
        if "skipped" in r:
            table.add_row(name, "skipped", "", "", r["skipped"])
        else:
            table.add_row(name, f"{r['samples_per_s']:,.0f}", f"{r['cpu_ms_per_sample']:.2f}",
                          f"{r['vs_baseline']:.2f}")
    console = Console()
    console.print(table)
    for what, t in report["targets"].items():
        got = "n/a" if t["measured"] is None else f"{t['measured']:,.2f}"
        console.print(f"target {what}: {t['target']:,} -> measured {got}, met: {t['met']}")
    console.print(f"load average before the run {m['load_avg_1min']:.2f} on {m['cpus']} CPUs; "
                  f"git {m['git_sha']}; " + ", ".join(f"{k} {m[k]}" for k in ("torch", "torchvision", "dali")))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder or manifest; default: the synthetic set")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on a GPU, 64 on a CPU")
    p.add_argument("--view-size", type=int, default=112)
    p.add_argument("--steps", type=int, default=None, help="per window; default 30 GPU, 8 CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    print_table(run(a.data, a.device, a.batch_size, a.view_size, a.steps, a.json, a.repeats,
                    a.warmup, log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    main()
