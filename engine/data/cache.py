"""Decode once: every image, decoded and resized, in one memory-mapped uint8 array.

The first run scans and decodes all files in parallel (one pass: the decode *is* the scan),
writes `<key>.npy` (N x S x S uint8) and `<key>.json` (which files failed and why) and
renames both into place; later runs with the same file list and storage size map the array
and decode nothing but the files that failed before (retried, in case a decoder was
installed since). The JSON also holds each file's content digest (a hash of its bytes): an
image's identity wherever its folder lives, which the leak checks compare. The key hashes
each file's path, byte size, modification and change times (a file renamed over another,
or rewritten with its old mtime restored, changes its ctime; a chmod does too, and costs a
re-decode), plus the storage size and the decoder: this format's version, a digest of the
decoding functions' source and the Pillow and pydicom versions. An edited or added file,
or a changed decoder, makes a new cache: pixels decoded otherwise are never served. (No
inode: network file systems may number files anew at each mount.)

A build writes `.<key>.npy.tmp<pid>@<host>` temporaries first (io.temp_path; earlier versions'
names had no leading dot). They are removed when the build
fails or is interrupted (Ctrl-C included), and a build clears those left by a process that
died harder (SIGKILL, power loss): same host, pid no longer running. Temporaries of other
hosts sharing the folder are left alone, since their pids mean nothing here.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..io import TEMP, temp_path
from .index import DataError, Record, decode_square

FORMAT_VERSION = 3  # 2: content digests; 3: the decoder's identity in the key


@functools.lru_cache(maxsize=1)
def decoder_identity() -> str:
    """What decides a cached image's pixels besides its file: the decoding code (index.py,
    dicom.py) and the libraries it calls. A fix there (DICOM padding, say) must not be hidden
    by images an earlier version decoded."""
    import inspect
    from importlib import metadata

    from . import dicom, index

    h = hashlib.sha256()
    for code in (index.decode_square, index.resize_square, index.load_gray, index._checked,
                 index._deep_colour, dicom):  # what turns a file into cached pixels
        h.update(inspect.getsource(code).encode())
    for pkg in ("pillow", "pydicom"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg}=none".encode())
    return h.hexdigest()[:16]


@dataclass
class Cache:
    images: np.ndarray  # (N, S, S) uint8, memory-mapped, row i = records[i]
    ok: np.ndarray  # (N,) bool: False where the file could not be used
    reasons: list[str | None]  # why a file was skipped (None when ok)
    digests: list[str | None]  # hash of each file's bytes (None when skipped): its identity
    key: str
    path: Path
    built: bool = False  # decoded by this call (a new cache), not mapped from disk


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSTL_CACHE", Path.home() / ".cache" / "sstl"))


def cache_key(records: list[Record], size: int) -> str:
    return key_for(file_states([r.path for r in records]), size, FORMAT_VERSION,
                   decoder_identity())


def file_states(paths: list[str]) -> list[tuple[str, os.stat_result | OSError]]:
    """Each path with its stat, or the error that stat raised (one stat per file)."""
    out: list[tuple[str, os.stat_result | OSError]] = []
    for path in paths:
        try:
            out.append((path, os.stat(path)))
        except OSError as e:
            out.append((path, e))
    return out


def key_for(states: list[tuple[str, os.stat_result | OSError]], size: int, version: int,
            decoder: str) -> str:
    """The key of these files (file_states) at this size, for a cache format and decoder
    (`sstl cache` computes it again with the ones a cache recorded: changed files, or
    another sstl?)."""
    h = hashlib.sha256(f"sstl-cache-v{version}:{size}:{decoder}".encode())
    for path, st in states:
        line = (f"{path}\0missing\n" if isinstance(st, OSError) else
                f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
        h.update(line.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8
    return h.hexdigest()[:24]


def file_digest(path: str | os.PathLike) -> str:
    """A file's identity by content (16 hex digits of BLAKE2b over its bytes): the same image
    copied, moved or seen through another folder keeps it."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode_one(path: str, size: int) -> tuple[np.ndarray | None, str | None, str | None]:
    """(image, why skipped, content digest): a file read again right after its decode is
    served from the page cache."""
    img, why = decode_square(path, size)
    if img is None:
        return None, why, None
    try:
        return img, None, file_digest(path)
    except OSError as e:  # gone between the two reads: skipped like any unreadable file
        return None, f"{type(e).__name__}: {e}", None


def _decode_into(out: np.ndarray, i: int, path: str, size: int) -> tuple[str | None, str | None]:
    img, why, digest = _decode_one(path, size)
    if img is not None:
        out[i] = img
    return why, digest


def load_or_build(records: list[Record], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int = 0, progress: Callable[[int, int], None] | None = None) -> Cache:
    """Map the cache for these records, building it first (in parallel) when it is missing."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cache folder {folder}: {e.strerror or e}; choose another "
                        "--cache-dir (or $SSTL_CACHE)") from None
    key = cache_key(records, size)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    built = not (npy.exists() and meta.exists())
    if built:
        _build(records, size, npy, meta, workers or os.cpu_count() or 1, progress)
    info = json.loads(meta.read_text())
    if not built:
        info = _retry_failures(records, size, npy, meta, info, workers or os.cpu_count() or 1)
    images = np.load(npy, mmap_mode="r")
    if (images.shape != (len(records), size, size) or len(info["reasons"]) != len(records)
            or len(info.get("digests", ())) != len(records)):
        raise RuntimeError(f"cache {npy} does not match its data; delete it and run again")
    reasons = info["reasons"]
    return Cache(images=images, ok=np.array([r is None for r in reasons], dtype=bool),
                 reasons=reasons, digests=info["digests"], key=key, path=npy, built=built)


def _retry_failures(records, size, npy: Path, meta: Path, info: dict, workers: int) -> dict:
    """Decode again the files a cached build could not use, and return the cache's record
    (`info`) as it now stands. The key covers the files, not the machine: a decoder installed
    since (the package a skip reason named), a file system that answered since, must not
    leave those files out for good. Usually a handful of files."""
    failed = [i for i, why in enumerate(info["reasons"]) if why is not None]
    if not failed or len(info["reasons"]) != len(records):
        return info
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(lambda i: _decode_one(records[i].path, size), failed))
    fixed = [(i, img) for i, (img, _, _) in zip(failed, decoded) if img is not None]
    if not fixed:
        return info
    new = {**info, "reasons": list(info["reasons"]), "digests": list(info["digests"])}
    for i, (img, why, digest) in zip(failed, decoded):
        new["reasons"][i], new["digests"][i] = why, digest
    tmp = temp_path(meta)
    try:
        rows = np.load(npy, mmap_mode="r+")
        for i, img in fixed:  # rows of failed files: no reader uses them (ok is False)
            rows[i] = img
        rows.flush()
        del rows
        tmp.write_text(json.dumps(new))
        os.replace(tmp, meta)  # readers see the old or the new list, never half of one
        return new
    except OSError:  # a read-only shared cache: those files stay skipped, as the log says
        tmp.unlink(missing_ok=True)
        return info


def _build(records, size, npy: Path, meta: Path, workers: int, progress) -> None:
    # Unique temporary names: several processes (e.g. torchrun ranks) may build at once,
    # and whichever renames last wins with identical content.
    clear_stale_temporaries(npy.parent)
    tmp_npy, tmp_meta = temp_path(npy), temp_path(meta)
    try:
        reasons, digests = _decode_all(records, size, tmp_npy, workers, progress)
        tmp_meta.write_text(json.dumps({"version": FORMAT_VERSION, "size": size,
                                        "decoder": decoder_identity(),
                                        "host": socket.gethostname(),
                                        "paths": [r.path for r in records], "reasons": reasons,
                                        "digests": digests}))
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta)
    except OSError as e:  # a read-only or full cache folder: its caches are read, not built
        raise DataError(f"could not build the decode cache in {npy.parent}: "
                        f"{e.strerror or e}; choose another --cache-dir (or $SSTL_CACHE), "
                        "or free some space there") from None
    finally:  # after success both are renamed away; after any failure nothing half-made stays
        for tmp in (tmp_npy, tmp_meta):
            with contextlib.suppress(OSError):  # (read-only: never made; its error is above)
                tmp.unlink(missing_ok=True)


def _decode_all(records, size, tmp_npy: Path, workers: int, progress):
    """Decode every file into the map; return (reasons, digests), one per record."""
    out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8,
                                    shape=(len(records), size, size))
    reasons: list[str | None] = [None] * len(records)
    digests: list[str | None] = [None] * len(records)
    # PIL releases the GIL while decoding and resizing, so threads scale across cores.
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(_decode_into, out, i, r.path, size) for i, r in enumerate(records)]
        for done, (i, fut) in enumerate(zip(range(len(records)), futures), 1):
            reasons[i], digests[i] = fut.result()
            if progress is not None:
                progress(done, len(records))
        out.flush()
    finally:
        # On Ctrl-C, drop the queued decodes instead of finishing them all; wait for the
        # running ones so no thread writes into the map after it is gone.
        pool.shutdown(wait=True, cancel_futures=True)
        del out
    return reasons, digests


def stale_temporaries(folder: Path) -> list[Path]:
    """Build temporaries whose process is gone (same host, or no host in the name: the older
    format). A temporary is a file (a cache being written) or a folder (the demo set being
    drawn, cut short by Ctrl-C)."""
    host = socket.gethostname()
    return [f for f in sorted(folder.glob("*.tmp*"))
            if (m := TEMP.search(f.name)) and (m.group(2) or host) == host
            and not _running(int(m.group(1)))]


def clear_stale_temporaries(folder: Path) -> tuple[list[Path], list[str]]:
    """Remove stale_temporaries(folder); return (what was removed, why the others could not
    be: another user's, in a shared folder). A build's housekeeping leaves those."""
    removed, failed = [], []
    for f in stale_temporaries(folder):
        try:
            remove(f)
            removed.append(f)
        except FileNotFoundError:  # another process cleared it first
            pass
        except OSError as err:
            failed.append(f"{f.name}: {err.strerror or err}")
    return removed, failed


def remove(path: Path) -> None:
    """Delete a file, or a folder with all it holds (a link itself, never what it points to);
    FileNotFoundError when it is gone already."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: keep the file rather than break a live build
    return True
