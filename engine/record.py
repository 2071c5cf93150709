"""What a run writes about itself besides its checkpoints: weights with their JSON sidecar,
an encoder's sidecar (its start, data, split and the images it learned from), per-epoch
metrics, and the code and machine it ran on (git SHA, versions).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from .io import atomic_write, save_json
from .keys import resume_key
from .models import ARCHS, imagenet_tag, learned_images, saw_all_unlabelled, start_sidecar

SRC = Path(__file__).resolve().parent.parent


def encoder_sidecar(cfg, ds, trained_idx, epoch: int, **extra) -> dict:
    """What an encoder.safetensors says of itself (pretrain's and stage 1's alike): its
    start, its data and split, and the images it learned from (`trained_idx`, plus those of
    its --init file), which finetune's leak check follows through every stage."""
    start = start_sidecar(cfg.init)
    if saw_all_unlabelled(start):  # the warning follows the weights
        extra["pretrain_split"] = "all"
    return {"kind": "sstl-encoder", "arch": cfg.arch, "init": cfg.init,
            "imagenet_weights": imagenet_tag(cfg.init, cfg.imagenet_weights), "epoch": epoch,
            "feat_dim": ARCHS[cfg.arch], "settings_hash": settings_hash(cfg),
            "split_seed": cfg.data.split_seed, "test_fraction": cfg.data.test_fraction,
            "data_fingerprint": ds.fingerprint(), "test_fingerprint": ds.fingerprint(ds.test_idx),
            "synthetic_data": ds.synthetic, "data_root": str(ds.root),
            "trained_on": sorted(set(ds.image_ids(trained_idx)) | learned_images(start)),
            **extra}


def settings_hash(cfg) -> str:
    """A weights file's record of the settings that made it: the run's resume key (its config
    less how and where it ran). The whole config's hash changed with --log-every or --device,
    so rerunning a finished run with one of those rewrote the file with other metadata, and
    every run started from it (keyed by the file) was refused as made from another file."""
    return resume_key(cfg)


def save_weights(state: dict, path: Path, meta: dict) -> None:
    """safetensors weights + a JSON sidecar (path.with_suffix('.json')), both atomic, 0644.
    The same state and meta give the same bytes (canonical_safetensors)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # The header repeats the sidecar but its image list (up to a data set's size: JSON only).
    header = {k: str(v) for k, v in meta.items() if k != "trained_on"}
    blob = canonical_safetensors(save(tensors, metadata=header))
    atomic_write(path, lambda tmp: tmp.write_bytes(blob))
    save_json(meta, path.with_suffix(".json"))


def canonical_safetensors(blob: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted. safetensors writes the header's
    metadata in hash-map order, which changes from call to call: a finished run rerun would
    rewrite its weights with other bytes, and whatever keys on them (an --init file's digest,
    reproduce's --transfer check) would take identical weights for a replaced file."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the format's alignment of the data that follows
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


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
