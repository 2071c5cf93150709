"""Decode once: every image, decoded and resized, in one memory-mapped uint8 array.

The first run scans and decodes all files in parallel (one pass: the decode *is* the scan),
writes `<key>.npy` (N x S x S uint8) and `<key>.json` (which files failed and why) and
renames both into place; later runs with the same file list and storage size map the array
and decode nothing. The key hashes each file's path, byte size and modification time, plus
the storage size and this format's version, so an edited or added file makes a new cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .index import Record, decode_square

FORMAT_VERSION = 1


@dataclass
class Cache:
    images: np.ndarray  # (N, S, S) uint8, memory-mapped, row i = records[i]
    ok: np.ndarray  # (N,) bool: False where the file could not be used
    reasons: list[str | None]  # why a file was skipped (None when ok)
    key: str
    path: Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSTL_CACHE", Path.home() / ".cache" / "sstl"))


def cache_key(records: list[Record], size: int) -> str:
    h = hashlib.sha256(f"sstl-cache-v{FORMAT_VERSION}:{size}".encode())
    for r in records:
        try:
            st = os.stat(r.path)
            h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{r.path}\0missing\n".encode())
    return h.hexdigest()[:24]


def _decode_into(out: np.ndarray, i: int, path: str, size: int) -> str | None:
    img, why = decode_square(path, size)
    if img is not None:
        out[i] = img
    return why


def load_or_build(records: list[Record], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int = 0, progress: Callable[[int, int], None] | None = None) -> Cache:
    """Map the cache for these records, building it first (in parallel) when it is missing."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(records, size)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.exists() and meta.exists()):
        _build(records, size, npy, meta, workers or os.cpu_count() or 1, progress)
    info = json.loads(meta.read_text())
    images = np.load(npy, mmap_mode="r")
    if images.shape != (len(records), size, size) or len(info["reasons"]) != len(records):
        raise RuntimeError(f"cache {npy} does not match its data; delete it and run again")
    reasons = info["reasons"]
    return Cache(images=images, ok=np.array([r is None for r in reasons], dtype=bool),
                 reasons=reasons, key=key, path=npy)


def _build(records, size, npy: Path, meta: Path, workers: int, progress) -> None:
    # Unique temporary names: several processes (e.g. torchrun ranks) may build at once,
    # and whichever renames last wins with identical content.
    tag = f".tmp{os.getpid()}"
    tmp_npy, tmp_meta = npy.with_name(npy.name + tag), meta.with_name(meta.name + tag)
    out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8,
                                    shape=(len(records), size, size))
    reasons: list[str | None] = [None] * len(records)
    # PIL releases the GIL while decoding and resizing, so threads scale across cores.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_into, out, i, r.path, size) for i, r in enumerate(records)]
        for done, (i, fut) in enumerate(zip(range(len(records)), futures), 1):
            reasons[i] = fut.result()
            if progress is not None:
                progress(done, len(records))
    out.flush()
    del out
    tmp_meta.write_text(json.dumps({"version": FORMAT_VERSION, "size": size,
                                    "paths": [r.path for r in records], "reasons": reasons}))
    os.replace(tmp_npy, npy)
    os.replace(tmp_meta, meta)
