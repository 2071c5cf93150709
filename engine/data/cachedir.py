"""What a cache folder holds, and which of it can never be read again (`sstl cache`).

A cache's key hashes its files' paths, sizes and times with the format and the decoder
(cache.py), so an edited file, a changed decoder or a new sstl makes a new cache and the old
one stays on disk. An entry is *stale* when its key, computed again from the paths its JSON
lists, no longer comes out: no run can ever map it, so deleting it loses nothing. Entries
whose files are all absent here are *elsewhere* (another machine sharing the folder, or a
data set that was moved or unmounted) and are kept: their files may come back. A `.npy`
without its JSON (a build cut short before its last rename) is *incomplete*, and the demo
set of an older sstl version is stale too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .cache import cache_key, clear_stale_temporaries

_KEY = re.compile(r"^[0-9a-f]{24}$")
_INCOMPLETE_AGE_S = 3600  # a younger orphan may be another process between its two renames


@dataclass
class Entry:
    name: str  # the cache key, or the demo set's folder name
    paths: list[Path]  # what deleting it removes
    bytes: int
    images: int  # rows (files listed); 0 when unknown
    side: int  # pixels per side; 0 when unknown
    root: str  # the folder its files share ("" when unknown)
    state: str  # current | stale | elsewhere | incomplete
    written: float  # mtime of its newest file

    @property
    def prunable(self) -> bool:
        """No run can read it: `sstl cache --prune` deletes it."""
        return self.state in ("stale", "incomplete")


def entries(folder: Path) -> list[Entry]:
    """Every cache and demo set in `folder`, newest first."""
    if not folder.is_dir():
        return []
    found = [_entry(npy) for npy in folder.glob("*.npy") if _KEY.match(npy.stem)]
    found += _demo_sets(folder)
    return sorted(found, key=lambda e: e.written, reverse=True)


def prune(folder: Path) -> list[Entry]:
    """Delete the stale and incomplete entries (and dead builds' temporaries); return them."""
    gone = [e for e in entries(folder) if e.prunable]
    for e in gone:
        for p in e.paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    clear_stale_temporaries(folder)
    return gone


def _entry(npy: Path) -> Entry:
    meta = npy.with_suffix(".json")
    files = [p for p in (npy, meta) if p.exists()]
    size = sum(p.stat().st_size for p in files)
    written = max(p.stat().st_mtime for p in files)
    try:
        info = json.loads(meta.read_text())
        paths, side = info["paths"], int(info["size"])
    except (OSError, ValueError, KeyError, TypeError):
        old = time.time() - written > _INCOMPLETE_AGE_S
        return Entry(npy.stem, files, size, 0, 0, "", "incomplete" if old else "current",
                     written)
    present = any(os.path.exists(p) for p in paths)
    if not present and paths:
        state = "elsewhere"
    else:
        same = cache_key([SimpleNamespace(path=p) for p in paths], side) == npy.stem
        state = "current" if same else "stale"
    return Entry(npy.stem, files, size, len(paths), side, _common_root(paths), state, written)


def _demo_sets(folder: Path) -> list[Entry]:
    from .synthetic import VERSION

    out = []
    for d in folder.glob("synthetic-v*"):
        if not d.is_dir() or ".tmp" in d.name:
            continue
        files = [f for f in d.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        state = "current" if d.name == f"synthetic-v{VERSION}" else "stale"
        out.append(Entry(d.name, [d], size, 0, 0, str(d), state, d.stat().st_mtime))
    return out


def _common_root(paths: list[str]) -> str:
    if not paths:
        return ""
    try:
        return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    except ValueError:  # mixed drives or absolute and relative paths
        return ""
