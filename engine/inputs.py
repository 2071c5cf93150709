"""Which inputs a run learns from, by content: its images, the encoder it fine-tunes, the
weights file it starts from. A checkpoint records them (run_inputs); resume refuses one made
from other inputs (changed_inputs), and accepts one whose inputs only moved (same_inputs).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from .data.cache import file_digest
from .models import is_start_file


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


def changed_inputs(old, new: str) -> list[str]:
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


def same_inputs(old, new: str) -> bool:
    """Whether a checkpoint's recorded inputs are this command's by content: its data with
    the images' digests (older identities hold paths only), and the same weights files."""
    return (isinstance(old, str) and bool(new) and "+" in inputs_parts(old)[0]
            and not changed_inputs(old, new))


def same_data(old: str, new: str) -> bool:
    """Whether two Dataset.identity() values name the same images. One recorded before
    identities held the images' contents (no '+') is compared by its paths alone."""
    paths, _, content = old.partition("+")
    paths2, _, content2 = new.partition("+")
    return paths == paths2 and (not content or not content2 or content == content2)
