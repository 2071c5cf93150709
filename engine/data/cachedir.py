"""What a cache folder holds, and which of it no run can read again (`sstl cache`).

A cache's key hashes its files' paths, sizes and times with the cache format and the decoder
(cache.py), so an edited file, a changed decoder or a new sstl makes a new cache, and the old
one stays on disk. A cache records the format and decoder that made it, so its key can be
computed again from its own JSON:
  current       this sstl maps it (the key comes out with today's decoder);
  stale         its files changed since (the key no longer comes out with its own decoder):
                no sstl of any version can read it;
  other sstl    another sstl version or decoder made it from files that did not change: that
                install (another environment sharing the folder) may still read it;
  elsewhere     its files are absent or unreadable here (another machine or user sharing the
                folder, a moved or unmounted data set): they may come back;
  building      a .npy without its JSON, under an hour old: a build in progress;
  incomplete    the same, older: a build cut short (Ctrl-C, a killed process).
Demo sets (synthetic-v*) of another sstl version, and caches of files inside the cache folder
that are gone (an older demo set's), are stale. `prune` deletes stale and incomplete entries,
and "other sstl" ones only when asked: the default folder is shared by every install.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import FORMAT_VERSION, clear_stale_temporaries, decoder_identity, key_for

_KEY = re.compile(r"^[0-9a-f]{24}$")
_BUILDING_S = 3600  # a younger orphan may be another process between its two renames
PRUNED = ("stale", "incomplete")


@dataclass
class Entry:
    name: str  # the cache key, or the demo set's folder name
    paths: list[Path]  # what deleting it removes
    bytes: int
    images: int  # rows (files listed); 0 when unknown
    side: int  # pixels per side; 0 when unknown
    root: str  # the folder its files share ("" when unknown)
    state: str  # see the module's docstring
    written: float  # mtime of its newest file

    @property
    def prunable(self) -> bool:
        """No run of any sstl can read it: `sstl cache --prune` deletes it."""
        return self.state in PRUNED


def entries(folder: Path) -> list[Entry]:
    """Every cache and demo set in `folder`, newest first."""
    if not folder.is_dir():
        return []
    stems = {p.stem for p in folder.glob("*.npy")} | {p.stem for p in folder.glob("*.json")}
    found = [e for stem in stems if _KEY.match(stem) for e in [_entry(folder, stem)] if e]
    found += _demo_sets(folder)
    return sorted(found, key=lambda e: e.written, reverse=True)


def prune(folder: Path, other_versions: bool = False) -> tuple[list[Entry], list[str]]:
    """Delete the stale and incomplete entries (and "other sstl" ones if asked) and dead
    builds' temporaries; return (what was deleted, why some could not be)."""
    doomed = PRUNED + (("other sstl",) if other_versions else ())
    gone, failed = [], []
    for e in entries(folder):
        if e.state not in doomed:
            continue
        try:
            for p in e.paths:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            gone.append(e)
        except OSError as err:  # another user's file in a shared folder, say
            failed.append(f"{e.name}: {err.strerror or err}")
    clear_stale_temporaries(folder)
    return gone, failed


def _entry(folder: Path, stem: str) -> Entry | None:
    npy, meta = folder / f"{stem}.npy", folder / f"{stem}.json"
    try:
        files = [p for p in (npy, meta) if p.exists()]
        stats = [p.stat() for p in files]
    except OSError:  # deleted while being listed (a concurrent prune)
        return None
    if not files:
        return None
    size, written = sum(s.st_size for s in stats), max(s.st_mtime for s in stats)
    try:
        info = json.loads(meta.read_text()) if npy.exists() else None
        paths, side = list(info["paths"]), int(info["size"])
        if not all(isinstance(p, str) for p in paths):
            raise TypeError("paths")
    except (OSError, ValueError, KeyError, TypeError):  # no JSON yet, or not one of ours
        young = time.time() - written < _BUILDING_S
        return Entry(stem, files, size, 0, 0, "", "building" if young else "incomplete",
                     written)
    state = _state(folder, stem, paths, side, info)
    return Entry(stem, files, size, len(paths), side, _common_root(paths), state, written)


def _state(folder: Path, key: str, paths: list[str], side: int, info: dict) -> str:
    from .synthetic import VERSION

    # Files inside the cache folder are a demo set's: another version's, or gone, is stale.
    demo = {_under(p, folder) for p in paths}
    if paths and demo <= {f"synthetic-v{v}" for v in range(VERSION)}:
        return "stale"
    seen = [_stat(p) for p in paths]
    if paths and None not in demo and all(s == "missing" for s in seen):
        return "stale"  # a demo set's cache, its files gone: a new draw makes new files
    if "unreadable" in seen or (paths and all(s == "missing" for s in seen)):
        return "elsewhere"
    if key_for(paths, side, FORMAT_VERSION, decoder_identity()) == key:
        return "current"
    version, decoder = info.get("version"), info.get("decoder")
    if version != FORMAT_VERSION or decoder is None:  # a key this sstl cannot recompute
        return "other sstl"
    return "other sstl" if key_for(paths, side, version, decoder) == key else "stale"


def _stat(path: str) -> str:
    try:
        os.stat(path)
        return "ok"
    except FileNotFoundError:
        return "missing"
    except OSError:  # permission denied, a hung mount: not ours to judge
        return "unreadable"


def _under(path: str, folder: Path) -> str | None:
    """The first part of `path` inside `folder` ("" for the folder itself), or None."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return None
    return rel.parts[0] if rel.parts else ""


def _demo_sets(folder: Path) -> list[Entry]:
    from .synthetic import VERSION

    out = []
    for d in folder.glob("synthetic-v*"):
        if not d.is_dir() or ".tmp" in d.name:
            continue
        try:
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            written = d.stat().st_mtime
        except OSError:  # deleted while being listed
            continue
        state = "current" if d.name == f"synthetic-v{VERSION}" else "stale"
        out.append(Entry(d.name, [d], size, 0, 0, str(d), state, written))
    return out


def _common_root(paths: list[str]) -> str:
    if not paths:
        return ""
    try:
        return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    except ValueError:  # mixed drives or absolute and relative paths
        return ""
