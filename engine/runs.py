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
import csv
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from . import dist
from .config import to_dict
from .data.cache import file_digest
from .io import TEMP, WriteError, atomic_write, first_line, make_dir, save_json
from .keys import config_hash
from .models import (ARCHS, imagenet_tag, is_start_file, learned_images, saw_all_unlabelled,
                     start_sidecar)

console = Console(stderr=True)
SRC = Path(__file__).resolve().parent.parent
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
        self.moved_from: str | None = None  # the key of a run continued from moved inputs
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
                log(f"aborted: {path} keeps its last checkpoint; the same command resumes from "
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
        self.discard_checkpoints()
        if self.is_main:
            for name in OUTPUTS:
                (self.path / name).unlink(missing_ok=True)
            self._before = {"timing.json": [], "config.json": []}

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

    def resume(self, key: str | tuple[str, ...], inputs: str = "", mmap: bool = False,
               changes: Callable[[], str] = lambda: "",
               moved: Callable[[], bool] = lambda: False) -> dict | None:
        """The newest readable checkpoint of this run, or None; refuses another run's (a key
        not among `key`), and one trained on other inputs (fit's Plan.inputs; older
        checkpoints carry none). mmap: map the tensors instead of reading them (a cheap look
        before anything is written). `changes()` says which settings differ, for the refusal.
        `moved()`: they differ only in where the inputs are; a checkpoint of the same images
        and weights (by content) is then continued, and stays accepted by this Run."""
        keys = (key,) if isinstance(key, str) else tuple(key)
        tried = []
        for f in (self.checkpoint, self.previous):
            if not f.exists():
                continue
            try:
                if not mmap:  # torch.load reads no checksum: a flipped bit would load silently
                    _check_crcs(f)
                ck = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as e:  # truncated, corrupt, or not a plain-data checkpoint
                log(f"warning: {f} cannot be read ({first_line(e, 160)}); trying the previous "
                    "checkpoint")
                tried.append(f.name)
                continue
            if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
                raise SystemExit(f"{f} is not an sstl checkpoint of this version; use another "
                                 "--name (or --no-resume to start over here)")
            accepted = (*keys, self.moved_from) if self.moved_from else keys
            if ck.get("resume_key") not in accepted:
                if not (_same_inputs(ck.get("inputs"), inputs) and moved()):
                    raise SystemExit(f"{f} was written by a run with different settings"
                                     f"{changes()}; use another --name (or --no-resume to "
                                     "start over here)")
                self.moved_from = ck.get("resume_key")
                log(f"continuing {f}: its inputs are elsewhere now{changes()}, the same "
                    "images and weights")
            changed = _changed(ck.get("inputs"), inputs) if inputs else []
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


def _changed(old, new: str) -> list[str]:
    """Which of a run's inputs differ between a checkpoint's and this command's, as the flags
    that give them; [] when none does (or the checkpoint predates recording its inputs)."""
    if old is None:
        return []
    if not isinstance(old, str):
        return ["--data images"]
    (data, encoder, start), (data2, encoder2, start2) = inputs_parts(old), inputs_parts(new)
    # A checkpoint without a start digest predates them: its start is not known to differ.
    return [name for name, differ in (("--data images", not same_data(data, data2)),
                                      ("--encoder file", encoder != encoder2),
                                      ("--init file", start is not None and start != start2))
            if differ]


def _same_inputs(old, new: str) -> bool:
    """Whether a checkpoint's recorded inputs are this command's by content: its data with
    the images' digests (older identities hold paths only), and the same weights files."""
    return (isinstance(old, str) and bool(new) and "+" in inputs_parts(old)[0]
            and not _changed(old, new))


def same_data(old: str, new: str) -> bool:
    """Whether two Dataset.identity() values name the same images. One recorded before
    identities held the images' contents (no '+') is compared by its paths alone."""
    paths, _, content = old.partition("+")
    paths2, _, content2 = new.partition("+")
    return paths == paths2 and (not content or not content2 or content == content2)


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


def encoder_sidecar(cfg, ds, trained_idx, epoch: int, **extra) -> dict:
    """What an encoder.safetensors says of itself (pretrain's and stage 1's alike): its
    start, its data and split, and the images it learned from (`trained_idx`, plus those of
    its --init file), which finetune's leak check follows through every stage."""
    start = start_sidecar(cfg.init)
    if saw_all_unlabelled(start):  # the warning follows the weights
        extra["pretrain_split"] = "all"
    return {"kind": "sstl-encoder", "arch": cfg.arch, "init": cfg.init,
            "imagenet_weights": imagenet_tag(cfg.init, cfg.imagenet_weights), "epoch": epoch,
            "feat_dim": ARCHS[cfg.arch], "config_hash": config_hash(cfg),
            "split_seed": cfg.data.split_seed, "test_fraction": cfg.data.test_fraction,
            "data_fingerprint": ds.fingerprint(), "test_fingerprint": ds.fingerprint(ds.test_idx),
            "synthetic_data": ds.synthetic, "data_root": str(ds.root),
            "trained_on": sorted(set(ds.image_ids(trained_idx)) | learned_images(start)),
            **extra}


def save_weights(state: dict, path: Path, meta: dict) -> None:
    """safetensors weights + a JSON sidecar (path.with_suffix('.json')), both atomic, 0644."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # The header repeats the sidecar but its image list (up to a data set's size: JSON only).
    header = {k: str(v) for k, v in meta.items() if k != "trained_on"}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    save_json(meta, path.with_suffix(".json"))


def git_sha() -> str:
    """The commit of the sstl source in use, with '+dirty' when it has local changes: read
    when this module was imported, so a long process (a reproduce grid, a benchmark) names
    the code it loaded, not a commit made while it ran."""
    return _SHA_AT_IMPORT


def _read_git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(SRC), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_SHA_AT_IMPORT = _read_git_sha()


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


class MetricsCSV:
    """Per-epoch metrics; a resumed run keeps the rows of the epochs its checkpoint holds."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path, self.is_main = path, is_main

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate(self, epochs: int) -> None:
        """Keep rows of epochs < `epochs` (a resume redoes the others)."""
        if self.is_main:
            self._write([r for r in self.rows() if int(r["epoch"]) < epochs])

    def append(self, row: dict) -> None:
        if self.is_main:
            self._write(self.rows() + [row])

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
        atomic_write(self.path, write)


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


def start_identity(init: str | None) -> str:
    """What an --init PATH start holds: the digest of its bytes (the data cache's
    file_digest), computed once per file state in a process. '' for imagenet and random
    (their resume keys name them)."""
    if not is_start_file(init):
        return ""
    f = Path(init).expanduser().resolve()
    if not f.is_file():
        return "missing"  # the model builder has already refused a missing start
    st = f.stat()
    return _digest(str(f), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """file_digest, once per (path, inode, size, mtime): a file replaced there is read again."""
    return file_digest(path)


def run_inputs(data: str, encoder: Path | None = None, init: str | None = None) -> str:
    """A checkpoint's `inputs`, what its run learns from: the data fingerprint, then ':' and
    the encoder's file_identity (fine-tuning from one), then ' init=' and the --init file's
    digest (a start from a file). Resume refuses a checkpoint of other inputs: a start file
    replaced in place would otherwise be continued from as if it were the one trained from."""
    s = data + (f":{file_identity(encoder)}" if encoder else "")
    start = start_identity(init)
    return s + (f" init={start}" if start else "")


def inputs_parts(inputs: str) -> tuple[str, str | None, str | None]:
    """(data fingerprint, encoder identity or None, start digest or None) of run_inputs' text."""
    rest, _, start = inputs.partition(" init=")
    data, _, encoder = rest.partition(":")
    return data, encoder or None, start or None


def file_identity(weights: Path) -> str:
    """Which weights file this is, cheaply: its size and its sidecar's text (the config, epoch
    and data fingerprints of the run that wrote it); a copy elsewhere is the same file."""
    weights = Path(weights)
    h = hashlib.sha256(str(weights.stat().st_size).encode())
    side = weights.with_suffix(".json")
    if side.exists():
        h.update(side.read_bytes())
    return h.hexdigest()[:16]
