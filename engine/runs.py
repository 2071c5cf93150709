"""Run directories: everything a run needs to explain, continue and reproduce itself.

runs/<name>/
  config.json          the frozen config, resolved values, versions, git SHA, command line
  data_report.json     what the scan found (skipped files and why); split.json: the split
  metrics.csv          one row per epoch
  timing.json          wall time of the run's phases (startup, data, build, train and its
                       first step, checkpoint, evaluate, report) and total: open to close;
                       a resumed run's earlier invocations under `earlier`
  checkpoint.pt        everything needed to continue exactly; checkpoint.prev.pt the one before
  *.safetensors        weights, each with a .json sidecar, always from the final checkpoint
  .lock                held by the one process training in this directory

Checkpoints hold tensors, numbers and strings only and are read with weights_only=True, so a
crafted file can never run code. They are copied to host memory at once and written on a
thread (the step does not wait for the disk), then rotated: a kill at any moment leaves a
readable checkpoint.pt or checkpoint.prev.pt (or a complete checkpoint.next.pt, which the
next run rotates into place). Resume checks every record's CRC before loading.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import threading
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from . import dist
from .config import to_dict
from .inputs import changed_inputs, same_inputs
from .io import TEMP, WriteError, atomic_write, first_line, make_dir, save_json
from .keys import config_hash
from .record import environment

class Output(Console):
    """A Rich console that outlives its reader: `sstl reproduce 2>&1 | head` closes the pipe
    after a few lines. Rich would exit (status 1) at the next line, losing what a run trained
    since its last checkpoint (or all of it, or a grid's later cells); the command goes on,
    its output to /dev/null instead. Every console of sstl's commands is one."""

    def on_broken_pipe(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.file.fileno())  # Python's own writes, and its flush at exit
        os.close(null)
        self.quiet = True


console = Output(stderr=True)  # the log
CHECKPOINT_FORMAT = 2  # 2: one checkpoint layout for every command (the shared loop)


def log(msg: str) -> None:
    if dist.is_main():  # under torchrun the other ranks would repeat every line
        # markup=False: paths and names are printed as they are ("runs[exp]" is no style tag)
        console.print(msg, markup=False, highlight=False, soft_wrap=True)


class Run:
    """A run directory held by this process: lock, checkpoints, and its other files."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path, self.is_main = path, is_main
        self.checkpoint, self.previous = path / "checkpoint.pt", path / "checkpoint.prev.pt"
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.timing: dict[str, float] = {}
        # Set by fit once the checkpoint was accepted: before that, a failure (a refused
        # rerun) leaves the run's files as they were, timing.json included.
        self.training = False
        # The checkpoint this run continues, as command.begin found it (None: from the start);
        # fit loads it. Decided once, before anything is written into the directory.
        self.found: dict | None = None
        # How the user continues this run after an interruption (check_resumable words it).
        self.again = "the same command again"
        self._before: dict[str, list[dict]] = {}  # earlier invocations' records (_earlier)

    @classmethod
    @contextlib.contextmanager
    def open(cls, out: str, name: str, is_main: bool = True):
        """Create or reopen runs/<name>, locked; a run that fails before its first checkpoint
        leaves no directory behind (unless the directory was there before).

        Under torchrun only rank 0 creates and locks the directory; the others wait for it
        and then use it without the lock (they read checkpoints, rank 0 writes every file)."""
        path = Path(out).expanduser() / name
        if not is_main:
            dist.barrier()  # rank 0 has created and locked the directory
            yield cls(path, False)
            return
        created = not path.exists()
        make_dir(path)
        lock = open(path / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise SystemExit(f"{path} is in use by another sstl process (pid {holder}); wait "
                             "for it, or give this run another --name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        run = cls(path, is_main)
        run._recover()
        dist.barrier()  # the other ranks may use the directory now
        opened = time.perf_counter()
        startup = _startup_seconds()
        if startup is not None:
            run.add_time("startup", startup)
        try:
            yield run
            run.add_time("total", time.perf_counter() - opened)
            run.write_timing()
        except BaseException as e:
            failed = run.flush(raise_errors=False)  # a checkpoint being written is finished
            kept = run.checkpoint.exists() or run.previous.exists()
            if created and not kept:
                shutil.rmtree(path, ignore_errors=True)  # nothing worth keeping was made
            elif run.training:  # an interrupted session's wall time counts in the total too
                run.add_time("total", time.perf_counter() - opened)
                with contextlib.suppress(Exception):
                    run.write_timing()
            if isinstance(e, KeyboardInterrupt):  # Ctrl-C twice: say what the abort kept
                log(f"aborted: {path} keeps its last checkpoint; {run.again} resumes from "
                    "it" if kept else "aborted before the first checkpoint: nothing was kept"
                    + (f" ({path} removed)" if created else ""))
            if failed is not None and isinstance(e, WriteError):
                # A full disk: the large checkpoint filled it, not the small file that failed
                # after it; naming only the latter would send the user the wrong way.
                raise WriteError(f"{failed}; then {e}") from None
            raise
        finally:
            run.flush(raise_errors=False)
            (path / ".lock").unlink(missing_ok=True)
            lock.close()

    # ------------------------------------------------------------------- checkpoints
    def _recover(self) -> None:
        """Under the lock, before anything reads the directory: finish what a killed writer
        left. Temporaries (io.temp_path's, up to a whole checkpoint each) are deleted,
        since no other process writes here; a checkpoint.next.pt is complete (it is renamed
        into place only once written), so a rotation cut between its two renames is finished
        and the newest checkpoint is the one resumed."""
        for tmp in self.path.glob(".*.tmp*"):
            if TEMP.search(tmp.name) and tmp.is_file():
                with contextlib.suppress(OSError):
                    tmp.unlink()
        nxt = self.path / "checkpoint.next.pt"
        if nxt.exists():
            if self.checkpoint.exists():
                os.replace(self.checkpoint, self.previous)
            os.replace(nxt, self.checkpoint)

    def discard_checkpoints(self) -> None:
        """--no-resume: the old checkpoints go at once, with the old metrics; left in place
        they would pass for this run's if it stopped before its first save."""
        if self.is_main:
            self.flush(raise_errors=False)
            for f in (self.checkpoint, self.previous, self.path / "checkpoint.next.pt"):
                f.unlink(missing_ok=True)

    def start_over(self) -> None:
        """--no-resume, before this run writes anything: the old run goes whole. Its weights,
        summary and card would otherwise stand beside this run's config until this one
        finished (an interrupted start-over left a stale encoder that finetune took), and its
        invocations would be counted as this run's in timing.json and config.json."""
        old = [f.name for f in (self.checkpoint, *(self.path / n for n in OUTPUTS))
               if f.exists()]
        self.discard_checkpoints()
        if self.is_main:
            for name in OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
            self._before = {"timing.json": [], "config.json": []}
        if old:  # the user asked for it, but work is deleted: say what went
            log(f"--no-resume: starting {self.path} over; the earlier run's "
                f"{', '.join(old)} removed")

    def save(self, state: dict) -> None:
        """Snapshot `state` to host memory now; write and rotate it on a background thread."""
        if not self.is_main:
            return
        t0 = time.perf_counter()
        self.flush()  # one write in flight at most; surfaces the previous write's error
        snapshot = _to_host(state)
        copied = None  # GPU tensors are copied asynchronously: the writer waits for the copies
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()
            copied.record()
        self._writer = threading.Thread(target=self._write, args=(snapshot, copied), daemon=True)
        self._writer.start()
        self.add_time("checkpoint", time.perf_counter() - t0)

    def _write(self, snapshot: dict, copied=None) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            nxt = self.path / "checkpoint.next.pt"
            atomic_write(nxt, lambda tmp: torch.save(snapshot, tmp))
            if self.checkpoint.exists():
                os.replace(self.checkpoint, self.previous)
            os.replace(nxt, self.checkpoint)
        except BaseException as e:  # re-raised in the main thread by flush()
            self._error = e

    def flush(self, raise_errors: bool = True) -> SystemExit | None:
        """Wait for the checkpoint being written; raise its error (disk full...) here, or
        with raise_errors=False return it (as a one-line SystemExit), or None."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        err, self._error = self._error, None
        if err is None:
            return None
        if not isinstance(err, SystemExit):
            err = WriteError(f"could not write {self.checkpoint}: {err}")
        if raise_errors:
            raise err from None
        return err

    def resume(self, key: str | tuple[str, ...], inputs: str = "",
               changes: Callable[[], str] = lambda: "",
               moved: Callable[[], bool] = lambda: False) -> dict | None:
        """The newest readable checkpoint of this run, or None; refuses another run's (a key
        not among `key`), and one trained on other inputs (fit's Plan.inputs; older
        checkpoints carry none). `changes()` says which settings differ, for the refusal.
        `moved()`: they differ only in where the inputs are; a checkpoint of the same images
        and weights (by content) is then continued."""
        keys = (key,) if isinstance(key, str) else tuple(key)
        tried = []
        for f in (self.checkpoint, self.previous):
            if not f.exists():
                continue
            try:
                _check_crcs(f)  # torch.load reads no checksum: a flipped bit would load silently
                ck = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated, corrupt, or not a plain-data checkpoint
                log(f"warning: {f} cannot be read ({first_line(e, 160)}); trying the previous "
                    "checkpoint")
                tried.append(f.name)
                continue
            if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
                raise SystemExit(f"{f} is not an sstl checkpoint of this version; use another "
                                 "--name (or --no-resume to start over here)")
            if ck.get("resume_key") not in keys:
                if not (same_inputs(ck.get("inputs"), inputs) and moved()):
                    raise SystemExit(f"{f} was written by a run with different settings"
                                     f"{changes()}; use another --name (or --no-resume to "
                                     "start over here)")
                log(f"continuing {f}: its inputs are elsewhere now{changes()}, the same "
                    "images and weights")
            changed = changed_inputs(ck.get("inputs"), inputs) if inputs else []
            if changed:
                raise SystemExit(f"{f} was trained on other inputs than this command's: the "
                                 f"{' and the '.join(changed)} changed since. Resuming would "
                                 "mix them; use another --name (or --no-resume to start over "
                                 "here)")
            if tried:
                log(f"resuming from {f.name} (the newer checkpoint was unreadable)")
            return ck
        if tried:
            raise SystemExit(f"no readable checkpoint in {self.path} ({', '.join(tried)}); "
                             "rerun with --no-resume to start over")
        return None

    # ------------------------------------------------------------------- other files
    def add_time(self, phase: str, seconds: float) -> None:
        self.timing[phase] = self.timing.get(phase, 0.0) + seconds

    def write_timing(self) -> None:
        """This invocation's phases at the top level; the earlier invocations of a resumed run
        under `earlier` (oldest first), so the run's whole wall time stays on record."""
        if self.is_main:
            now = {k: round(v, 3) for k, v in self.timing.items()}
            earlier = self._earlier("timing.json", "earlier")
            save_json({**now, "sessions": len(earlier) + 1, "earlier": earlier,
                       "total_all_sessions": round(sum(e.get("total", 0.0) for e in earlier)
                                                   + now.get("total", 0.0), 3)},
                      self.path / "timing.json")

    def write_config(self, cfg, resolved, extra: dict | None = None) -> None:
        if self.is_main:
            # Each earlier invocation with the code, versions and device it trained on: a
            # resumed or rerun run may have been trained by several.
            earlier = [{k: e.get(k) for k in ("command", "cwd", "time", "environment",
                                              "resolved")}
                       for e in self._earlier("config.json", "earlier_commands")]
            save_json({"config": to_dict(cfg), "config_hash": config_hash(cfg),
                       "resolved": asdict(resolved), "environment": environment(),
                       # The folder the command ran in: its relative paths are relative to it.
                       "command": sys.argv, "cwd": os.getcwd(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "earlier_commands": earlier, **(extra or {})}, self.path / "config.json")

    def _earlier(self, name: str, key: str) -> list[dict]:
        """The entries of `key` in the file an earlier invocation of this run wrote, then that
        invocation itself; read once, when this one first writes the file."""
        if name not in self._before:
            self._before[name] = []
            f = self.path / name
            if f.exists():
                try:
                    old = json.loads(f.read_text())
                    for derived in ("sessions", "total_all_sessions"):  # timing's sums
                        old.pop(derived, None)
                    self._before[name] = [*old.pop(key, []), old]
                except (ValueError, OSError):  # unreadable: start the record again
                    pass
        return self._before[name]


# What a finished run leaves besides its checkpoints and the files every start rewrites.
OUTPUTS = ("encoder.safetensors", "encoder.json", "model.safetensors", "model.json",
           "model.onnx", "model.onnx.json", "summary.json", "MODEL_CARD.md", "curves.png",
           "roc.png", "confusion_matrix.png", "metrics.csv")

_STARTUP_RECORDED = False


def _startup_seconds() -> float | None:
    """Seconds from this process's start to now (Python, imports, CUDA), for the first run
    directory a process opens (later ones, in `sstl reproduce`, started long after); None
    after that or where /proc is absent."""
    global _STARTUP_RECORDED
    if _STARTUP_RECORDED:
        return None
    _STARTUP_RECORDED = True
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _check_crcs(f: Path) -> None:
    """Raise if any record of a checkpoint (a zip archive) fails its CRC-32."""
    with zipfile.ZipFile(f) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"record {bad} fails its checksum (the file is damaged)")


def _to_host(obj):
    """A deep copy of a state tree with every tensor on the CPU (safe to write on a thread).

    A CUDA tensor goes to pinned memory with a non-blocking copy, so the training step is not
    held up by the transfer; later in-place updates queue behind the copy on the same stream."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:  # empty_like keeps the strides: a channels_last tensor stays one
            host = torch.empty_like(obj, device="cpu", pin_memory=True)
            return host.copy_(obj.detach(), non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


class Reporter:
    """A rich progress bar on a terminal, plain log lines elsewhere (CI, files, pipes)."""

    def __init__(self, total_steps: int, description: str, done: int = 0, live: bool = True):
        self.live = live and console.is_terminal and not os.environ.get("SSTL_PLAIN_LOG")
        self.total, self.desc = total_steps, description
        if self.live:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task(description, total=total_steps, completed=done,
                                               stats="")
            self.progress.start()
        self.enabled = live

    def update(self, step: int, stats: str) -> None:
        if self.live:
            self.progress.update(self.task, completed=step, stats=stats)
        elif self.enabled:
            log(f"{self.desc} step {step}/{self.total} {stats}")

    def close(self) -> None:
        if self.live:
            self.progress.stop()
            self.live = False
