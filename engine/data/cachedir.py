"""What a cache folder holds, and which of it no run can read again (`sstl cache`).

A cache's key hashes its files' paths, sizes and times with the cache format and the decoder
(cache.py), so an edited file, a changed decoder or a new sstl makes a new cache, and the old
one stays on disk. A cache records the format, decoder and host that made it, so its key can
be computed again from its own JSON:
  current       this sstl maps it (the key comes out with today's decoder);
  stale         made here, its files changed since (the key no longer comes out with its own
                decoder): no sstl of any version can read it;
  other sstl    another sstl version or decoder made it from files that did not change (or
                it predates these records): that install, sharing the folder, may read it;
  elsewhere     its files are absent or unreadable here, or it was made on another machine
                whose files (same paths, other times) this one cannot judge;
  building      a .npy or .json without its other half, under an hour old: a build going on;
  incomplete    the same, older: a build cut short (Ctrl-C, a killed process).
The demo set (synthetic-v<N>, drawn into the cache folder) of another sstl version is "other
sstl"; a cache of demo-set files that are gone is stale (a new draw makes new files).
`prune` deletes stale and incomplete entries, and "other sstl" ones only when asked: the
default folder is shared by every install on the machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import (FORMAT_VERSION, clear_stale_temporaries, decoder_identity, file_states,
                    key_for, remove, stale_temporaries)

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


def entries(folder: Path, root: str | None = None) -> list[Entry]:
    """Every cache and demo set in `folder`, newest first; with `root`, only the caches of
    files under that folder (what a new cache of it may have replaced: cheaper)."""
    if not folder.is_dir():
        return []
    stems = {p.stem for p in folder.glob("*.npy")} | {p.stem for p in folder.glob("*.json")}
    found = [e for stem in sorted(stems) if _KEY.match(stem)
             for e in [_entry(folder, stem, root)] if e]
    if root is None:
        found += _demo_sets(folder)
    return sorted(found, key=lambda e: e.written, reverse=True)


def prune(folder: Path, other_versions: bool = False) -> tuple[list[Entry], list[str], int]:
    """Delete the stale and incomplete entries (and "other sstl" ones if asked) and dead
    builds' temporaries; return (what was deleted, why some could not be, the temporaries'
    bytes). Two passes: a demo set deleted in the first leaves its caches stale for the
    second."""
    doomed = PRUNED + (("other sstl",) if other_versions else ())
    gone: list[Entry] = []
    failed: list[str] = []
    tried: set[str] = set()
    for _ in range(2):
        for e in entries(folder):
            if e.state in doomed and e.name not in tried and _unchanged(folder, e):
                tried.add(e.name)
                try:
                    for p in e.paths:
                        with contextlib.suppress(FileNotFoundError):  # gone already
                            remove(p)
                    gone.append(e)
                except OSError as err:  # another user's file in a shared folder, say
                    failed.append(f"{e.name}: {err.strerror or err}")
    sizes = {t: _bytes(t) for t in stale_temporaries(folder)}  # measured before they go
    removed, refused = clear_stale_temporaries(folder)
    return gone, failed + refused, sum(sizes.get(t, 0) for t in removed)


def temporaries_bytes(folder: Path) -> int:
    """Bytes held by dead builds' temporaries (a cache's .npy cut by a kill: up to the whole
    cache) in `folder`."""
    return sum(_bytes(t) for t in stale_temporaries(folder))


def _bytes(path: Path) -> int:
    """A file's size, or a folder's files' (the demo set's temporary is a folder)."""
    total = 0
    for f in (path.rglob("*") if path.is_dir() else (path,)):
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _unchanged(folder: Path, e: Entry) -> bool:
    """Whether an entry is as it was listed: a build may have completed it since (a listing
    of many caches takes a while), and then it is not deleted."""
    if not _KEY.match(e.name):
        return True  # a demo set: its state depends on its name alone
    now = _entry(folder, e.name, None)
    return now is not None and (now.state, now.written) == (e.state, e.written)


def _entry(folder: Path, stem: str, root: str | None) -> Entry | None:
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
        info = json.loads(meta.read_text()) if npy in files else None
        paths, side = list(info["paths"]), int(info["size"])
        if not all(isinstance(p, str) for p in paths):
            raise TypeError("paths")
    except (OSError, ValueError, KeyError, TypeError, OverflowError):  # half a build, or
        young = time.time() - written < _BUILDING_S                    # not one of ours
        return None if root is not None else Entry(
            stem, files, size, 0, 0, "", "building" if young else "incomplete", written)
    common = common_root(paths)
    if root is not None and common != root:
        return None
    try:
        state = _state(folder, stem, paths, side, info)
    except (ValueError, TypeError, UnicodeError):  # a path this system cannot even stat
        state = "elsewhere"
    return Entry(stem, files, size, len(paths), side, common, state, written)


def _state(folder: Path, key: str, paths: list[str], side: int, info: dict) -> str:
    states = file_states(paths)  # one stat per file, for every key below
    errors = [st for _, st in states if isinstance(st, OSError)]
    missing = sum(isinstance(e, FileNotFoundError) for e in errors)
    if missing < len(errors):
        return "elsewhere"  # permission denied, a hung mount: not ours to judge
    if paths and missing == len(paths):
        inside = all(_inside(p, folder) for p in paths)  # a demo set's, gone: never again
        return "stale" if inside else "elsewhere"
    if key_for(states, side, FORMAT_VERSION, decoder_identity()) == key:
        return "current"
    version, decoder = info.get("version"), info.get("decoder")
    if version != FORMAT_VERSION or decoder is None:  # a key this sstl cannot recompute
        return "other sstl"
    if key_for(states, side, version, decoder) == key:
        return "other sstl"
    host = info.get("host")
    return "elsewhere" if host and host != socket.gethostname() else "stale"


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


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
        state = "current" if d.name == f"synthetic-v{VERSION}" else "other sstl"
        out.append(Entry(d.name, [d], size, 0, 0, str(d), state, written))
    return out


def common_root(paths: list[str]) -> str:
    if not paths:
        return ""
    try:
        return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    except ValueError:  # mixed drives or absolute and relative paths
        return ""
