"""Writing files so that a crash, a kill or a full disk never leaves half a file behind.

Every file the engine writes goes through `atomic_write` (the benchmarks' JSON reports are
written directly): the bytes go to a temporary name in the same folder (`temp_path`: one
naming for every temporary sstl makes, so whoever sweeps a folder recognises them), are flushed to the disk, get the usual permissions (0644: sidecars and weights
are read by other users and tools alike), and only then replace the real name. A failure
(disk full, read-only folder) removes the temporary and becomes one clear `WriteError`.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Callable


class WriteError(SystemExit):
    """A file could not be written (disk full, read-only folder...): one line, exit 1."""


# A temporary's writer: its pid and host (files of earlier versions: pid only, or not hidden).
TEMP = re.compile(r"\.tmp(\d+)(?:@(.+))?$")


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden name `path` is written under before it is renamed into place:
    `.<name>.tmp<pid>@<host>`. Unique per process, also in a folder several hosts share (a
    cache), and a sweep can tell whether its writer is gone (data/cache.py)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}@{socket.gethostname()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 flag: str = "--out") -> Path:
    """Call write(tmp) to fill a temporary file, then move it over `path` in one rename.
    `flag`: the option that chose the place, named in the error."""
    path, tmp = Path(path), temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e, flag) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def first_line(e: BaseException, limit: int = 200) -> str:
    """An error's first line (its type's name when it says nothing), cut to `limit`: what a
    one-line message quotes of a library's multi-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def save_json(obj, path: str | os.PathLike) -> Path:
    """Strict JSON: an undefined number (the AUC of a set without one class) is written as
    null, since Python's bare NaN is rejected by other readers (JavaScript, jq, databases)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0:  # a NumPy scalar
        return _finite(obj.item())
    return obj


def make_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """mkdir -p with a one-line answer when the place is not writable (`flag` chose it)."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"could not create {path}: {e.strerror or e}{_advice(e, flag)}") from None
    if not os.access(path, os.W_OK):
        raise WriteError(f"{path} is not writable (choose another {flag})")
    return path


def write_error(path: str | os.PathLike, e: OSError, flag: str = "--out") -> WriteError:
    """The one line for a file that could not be written, with what to do about it."""
    return WriteError(f"could not write {path}: {e.strerror or e}{_advice(e, flag)}")


def _advice(e: OSError, flag: str) -> str:
    """What to do about a failed write, by its cause."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f" (free some space or choose another {flag})"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f" (choose another {flag}: this place is not writable)"
    return f" (choose another {flag})"
