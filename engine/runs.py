"""Run directories: everything a run needs to explain and reproduce itself, written safely.

runs/<name>/
  config.json        the frozen config, the resolved values, versions, git SHA, command line
  data_report.json   what the scan found (skipped files and why)
  split.json         the train/test split (relative paths)
  metrics.csv        one row per epoch
  checkpoint.pt      everything needed to continue (written atomically)
  *.safetensors      weights, each with a .json sidecar
"""
from __future__ import annotations

import csv
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from .config import config_hash, save_json, to_dict

console = Console(stderr=True)
SRC = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """The commit of the sstl source in use, with '+dirty' when it has local changes."""
    try:
        sha = subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(SRC), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"sstl": version("sstl"), "git_sha": git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": version("torchvision"),
            "triton": version("triton"), "dali": version("nvidia-dali-cuda120"),
            "cuda": torch.version.cuda, "gpu": gpu, "cpu_count": os.cpu_count(),
            "host": socket.gethostname(), "platform": platform.platform()}


def make_run_dir(out: str, name: str | None, prefix: str) -> Path:
    name = name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(out).expanduser() / name
    run.mkdir(parents=True, exist_ok=True)
    return run


def write_config(run: Path, cfg, resolved, extra: dict | None = None) -> None:
    save_json({"config": to_dict(cfg), "config_hash": config_hash(cfg),
               "resolved": asdict(resolved), "environment": environment(),
               "command": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **(extra or {})}, run / "config.json")


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(module_state: dict, path: Path, meta: dict) -> None:
    """safetensors weights + a JSON sidecar (path.with_suffix('.json')), both atomic."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in module_state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)
    save_json(meta, path.with_suffix(".json"))


class MetricsCSV:
    """Append-only per-epoch metrics; a resumed run keeps the rows it already wrote."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate(self, epochs: int) -> None:
        """Drop rows past `epochs` (a resume from an earlier checkpoint redoes them)."""
        rows = [r for r in self.rows() if int(r["epoch"]) < epochs]
        self.path.unlink(missing_ok=True)
        for r in rows:
            self.append(r)

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


class Reporter:
    """A rich progress bar on a terminal, plain log lines elsewhere (CI, files, pipes)."""

    def __init__(self, total_steps: int, description: str, done: int = 0):
        self.live = console.is_terminal and not os.environ.get("SSTL_PLAIN_LOG")
        self.total, self.desc = total_steps, description
        if self.live:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task(description, total=total_steps, completed=done,
                                               stats="")
            self.progress.start()

    def update(self, step: int, stats: str) -> None:
        if self.live:
            self.progress.update(self.task, completed=step, stats=stats)
        else:
            console.print(f"{self.desc} step {step}/{self.total} {stats}", highlight=False)

    @staticmethod
    def log_line(msg: str) -> None:
        console.print(msg, highlight=False)

    def close(self) -> None:
        if self.live:
            self.progress.stop()

    def interrupted(self, checkpoint: Path):
        """Ctrl-C: nothing is lost past the last checkpoint, and the same command continues."""
        self.close()
        self.log_line(f"interrupted: the last checkpoint is {checkpoint}; "
                      "run the same command again to continue")
        raise SystemExit(130)
