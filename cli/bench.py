"""`sstl bench`: the step, data and kernel benchmarks, side by side, as a table and one JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sstl.cli.paths import path_value
from sstl.engine.config import BenchConfig, pick_device
from sstl.engine.runs import Output


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


HEADERS = {"ms_per_step": "ms/step", "images_per_s": "img/s", "x_peer": "x peer", "mfu": "MFU",
           "peak_mem_gb": "mem GB"}


def print_rows(title: str, rows: list[dict], columns: list[str]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(HEADERS.get(c, c), justify="left" if c in ("rung", "target", "skipped") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    Output().print(table)


B = BenchConfig


def bench(
    what: str = typer.Option(B.what, help="step | data | kernels | all"),
    data: Optional[Path] = typer.Option(None, help="Images for step/data \\[default: the embedded synthetic set]",
                                        parser=path_value),
    device: str = typer.Option(B.device, help="auto | cuda | cpu"),
    arch: str = typer.Option(B.arch, help="resnet50 | resnet18"),
    batch_size: Optional[int] = typer.Option(
        None, help="\\[default: 256 on a GPU; on a CPU 32 for step, 64 for data]"),
    view_size: int = typer.Option(B.view_size, help="Side of each view"),
    steps: Optional[int] = typer.Option(
        None, help="Timed steps per repeat \\[default: step 20 GPU, 2 CPU; data 30 GPU, 8 CPU]"),
    cpu_all: bool = typer.Option(B.cpu_all, help="Also run the bf16 and compile rungs on a CPU"),
    json: Optional[Path] = typer.Option(None, "--json", help="Write all results to this JSON file",
                                        parser=path_value),
):
    """Measure sstl against the peer baseline and the chip (see benchmarks/)."""
    from sstl.engine.config import check

    run(check(BenchConfig(what=what, data=str(data) if data else None, device=device, arch=arch,
                          batch_size=batch_size, view_size=view_size, steps=steps,
                          cpu_all=cpu_all, json=str(json) if json else None)))


def run(cfg: BenchConfig) -> None:
    """The benchmarks `cfg.what` names, each printed as a table, then all in one JSON."""
    from sstl.benchmarks.common import write_json
    from sstl.engine.accel import compile_cache_dir

    compile_cache_dir()  # compiled rungs and kernels cached where the training commands' are
    out = {}
    if cfg.what in ("step", "all"):
        from sstl.benchmarks import step

        r = out["step"] = step.run(cfg.data, cfg.device, cfg.arch, cfg.batch_size, cfg.view_size,
                                   cfg.steps, cpu_all=cfg.cpu_all)
        print_rows(f"SSL step: {cfg.arch}, batch {r['batch_size']}, 2x{cfg.view_size}px views, "
                   f"{r['machine']['gpu'] or 'CPU'} (peak {r['peak_flops'] / 1e12:.3g} TFLOP/s, "
                   f"{r['peak_source']})", r["rows"],
                   ["rung", "ms_per_step", "images_per_s", "x_peer", "mfu", "peak_mem_gb", "skipped"])
        print_rows("targets", r["targets"], ["target", "value", "met"])
    if cfg.what in ("data", "all"):
        from sstl.benchmarks import data as data_bench

        out["data"] = data_bench.run(data=cfg.data, device=cfg.device, batch_size=cfg.batch_size,
                                     view_size=cfg.view_size, steps=cfg.steps)
        data_bench.print_table(out["data"])
    if cfg.what in ("kernels", "all"):
        from sstl.benchmarks import kernels

        out["kernels"] = kernels.run(device=pick_device(cfg.device).split(":")[0], arch=cfg.arch)
        kernels.print_report(out["kernels"])
    write_json(out, cfg.json)
