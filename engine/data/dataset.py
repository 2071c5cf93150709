"""From a user's path to a checked, split, cached data set: the data layer's one entry point.

files / manifest -> scan + decode once (cache) -> report bad files -> split -> Dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..io import save_json
from .cache import Cache, load_or_build
from .index import DataError, Record, Scan, scan, spelling_clashes
from .split import split_test

if TYPE_CHECKING:  # the config is read, never imported: data sits below config
    from ..config import DataConfig


@dataclass
class Dataset:
    root: Path
    records: list[Record]  # usable images only, in index order
    images: np.ndarray  # (N, S, S) uint8 memmap rows for `records` (a view or a gather)
    class_names: list[str]  # sorted; empty for unlabelled data
    targets: np.ndarray  # (N,) int64 class index; -1 when unlabelled
    is_test: np.ndarray  # (N,) bool
    synthetic: bool
    report: dict  # what the scan found
    digests: list[str]  # each record's content digest (the cache's): its identity anywhere

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(~self.is_test)

    @property
    def test_idx(self) -> np.ndarray:
        return np.flatnonzero(self.is_test)

    @property
    def labels(self) -> list:
        return [r.label for r in self.records]

    @property
    def groups(self) -> list:
        return [r.group for r in self.records]

    def fingerprint(self, idx=None) -> str:
        """Identity of a set of images (paths relative to the root): compares splits across runs."""
        idx = range(len(self.records)) if idx is None else idx
        h = hashlib.sha256("\n".join(sorted(self.records[i].rel for i in idx)).encode())
        return h.hexdigest()[:16]

    def identity(self) -> str:
        """What a run learns from, for its resume check: the fingerprint of the paths, then '+'
        and a digest of every image's bytes, label, group and fixed split. An image edited or
        relabelled in place keeps its path; its run must not be continued as if on the same
        data, nor its outputs rewritten to vouch for images it never trained on."""
        lines = sorted(f"{r.rel}\t{r.label}\t{r.group}\t{r.split}\t{d}"
                       for r, d in zip(self.records, self.digests))
        return f"{self.fingerprint()}+{hashlib.sha256(chr(10).join(lines).encode()).hexdigest()[:16]}"

    def image_ids(self, idx=None) -> list[str]:
        """Each image's identity wherever the data folder lives and whatever it is called: the
        digest of its bytes (16 hex digits). Sidecars list the images their weights learned
        from (`trained_on`), so a later run can tell exactly whether it would test on one of
        them, also through another folder (a pool that holds the labelled set)."""
        idx = range(len(self.records)) if idx is None else idx
        return [self.digests[i] for i in idx]

    def _path_ids(self, idx) -> list[str]:
        """The identity sidecars written before content digests used (12 hex digits): a hash
        of the path below the root and the byte size. Read, never written."""
        out = []
        for i in idx:
            r = self.records[i]
            size = os.stat(r.path).st_size if os.path.exists(r.path) else -1
            out.append(hashlib.blake2b(f"{r.rel}\0{size}".encode(), digest_size=6).hexdigest())
        return out

    def learned(self, trained_on, idx) -> np.ndarray:
        """(len(idx),) bool: which images of `idx` a sidecar's `trained_on` lists (by content;
        by path and size for ids of older sidecars)."""
        known = set(trained_on)
        seen = np.array([i in known for i in self.image_ids(idx)], dtype=bool)
        if any(len(i) == 12 for i in known):
            seen |= np.array([i in known for i in self._path_ids(idx)], dtype=bool)
        return seen

    def split_dict(self) -> dict:
        return {"train": [self.records[i].rel for i in self.train_idx],
                "test": [self.records[i].rel for i in self.test_idx],
                "data_fingerprint": self.fingerprint(),
                "test_fingerprint": self.fingerprint(self.test_idx)}


def _note_stale_caches(folder: Path, paths: list[str], log: Callable[[str], None]) -> None:
    """Say when older caches of these files (edited since) lie in the folder: only those are
    looked at, so a large shared folder costs little."""
    from .cachedir import common_root, entries

    try:
        stale = [e for e in entries(folder, root=common_root(paths)) if e.state == "stale"]
    except Exception:  # a note only: a shared folder's oddities must never stop the run
        return
    if stale:
        mb = sum(e.bytes for e in stale) / 2**20
        log(f"data: {folder} also holds {len(stale)} stale cache{'s' * (len(stale) != 1)} "
            f"of these files ({mb:,.1f} MB) that no run can read; `sstl cache --prune` "
            "deletes them")


def first_problems(report: dict, n: int = 3) -> str:
    """The first skipped files and why, for one line: 'a.png: not an image; ...'."""
    shown = "; ".join(f"{s['path']}: {s['reason']}" for s in report["skipped"][:n])
    more = len(report["skipped"]) - n
    return shown + (f"; {more} more" if more > 0 else "")


def load_dataset(cfg: DataConfig, need_labels: bool = False,
                 log: Callable[[str], None] = print,
                 progress: Callable[[int, int], None] | None = None) -> Dataset:
    synthetic = cfg.path is None
    if synthetic:
        from .synthetic import ensure_synthetic

        path = ensure_synthetic()
        log(f"no --data given: using the embedded SYNTHETIC default set at {path} "
            "(procedurally drawn radiograph-like images, not real X-rays)")
    else:
        path = cfg.path
    found = scan(path)
    root, candidates = found.root, found.records
    for note in found.notes:
        log(f"data: {note}")
    cache = load_or_build(candidates, cfg.cache_size, cfg.cache_dir, cfg.scan_workers, progress)
    report = scan_report(root, candidates, cache, found)
    if cache.built:  # a new cache: the one it replaces (edited files, new sstl) may linger
        _note_stale_caches(cache.path.parent, [r.path for r in candidates], log)
    log(f"data: {report['usable']} usable images of {report['found']} found under {root}"
        + (f"; {report['unreadable']} skipped" if report["unreadable"] else "")
        + (f"; {report['left_out']} image files left out" if report["left_out"] else "")
        + (f" ({first_problems(report)}; data_report.json lists them all: a training "
             "run's, or the folder of evaluate --out)"
           if report["skipped"] else ""))
    keep = np.flatnonzero(cache.ok)
    if len(keep) == 0:
        raise DataError(f"--data {root}: none of the {len(candidates)} files could be read "
                        f"({first_problems(report)})")
    records = [candidates[i] for i in keep]
    digests = [cache.digests[i] for i in keep]
    records = group_copies(records, digests, log)
    labels = [r.label for r in records]
    labelled = all(lab is not None for lab in labels)
    if need_labels and not labelled and any(r.label is not None for r in candidates):
        blank = [r.rel for r in candidates if r.label is None]
        raise DataError(f"--data {root}: {len(blank)} of {len(candidates)} manifest rows have no "
                        f"label (first: {', '.join(blank[:3])}); fill in their `label` or remove "
                        "them")
    if need_labels and (clashes := spelling_clashes(labels)):
        listed = "; ".join(" and ".join(repr(x) for x in c) for c in clashes)
        raise DataError(f"--data {root}: labels that differ only in case, spaces or "
                        f"underscores would be separate classes: {listed}; spell each class "
                        "one way")
    if need_labels and not labelled:
        raise DataError(f"--data {root}: this command needs labels (class folders or a manifest "
                        "`label` column), but the images are unlabelled")
    if not need_labels:  # unlabelled use (pretraining): an empty folder is just empty
        for name in found.empty_folders:
            log(f"data: folder {name!r} is empty")
    if need_labels and found.empty_folders:  # a class that failed to copy, most likely
        raise DataError(f"--data {root}: folder {found.empty_folders[0]!r} beside the class "
                        "folders is empty: a class without images would be left out of the "
                        "model unsaid. Add its images, or remove the folder")
    for cls, n in report["classes_found"].items():
        if report["classes"].get(cls, 0) == 0:
            raise DataError(f"--data {root}: class {cls!r} has no usable image "
                            f"({n} found, all skipped); fix or remove that folder")
    class_names = sorted(set(labels)) if labelled else []
    targets = np.array([class_names.index(lab) for lab in labels] if labelled
                       else [-1] * len(records), dtype=np.int64)
    fixed = [r.split for r in records]
    try:
        is_test = split_test(labels, [r.group for r in records], cfg.test_fraction,
                             cfg.split_seed, fixed if any(fixed) else None)
    except ValueError as e:  # a manifest that fixes one group to both sides
        raise DataError(f"--data {root}: {e}") from None
    contiguous = len(keep) == len(candidates)  # avoid copying the map when nothing was skipped
    images = cache.images if contiguous else cache.images[keep]
    return Dataset(root=root, records=records, images=images, class_names=class_names,
                   targets=targets, is_test=is_test, synthetic=synthetic, report=report,
                   digests=digests)


def group_copies(records: list[Record], digests: list[str],
                 log: Callable[[str], None] = print) -> list[Record]:
    """Byte-identical files join one group (their groups merged), so every copy of an image
    lands on the same side of the split: a copy on each side would be a test image trained
    on, and the leak checks (which know images by content) would refuse the encoder."""
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    first: dict[str, int] = {}
    copies, mixed = 0, set()
    for i, d in enumerate(digests):
        if d not in first:
            first[d] = i
            continue
        copies += 1
        j = first[d]
        if records[i].label != records[j].label:
            mixed.add(d)
        a, b = root(records[j].group), root(records[i].group)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller name: the same result in any order
    if not copies:
        return records
    log(f"data: {copies} file{'s are' if copies != 1 else ' is a'} byte-identical "
        f"cop{'ies of others' if copies != 1 else 'y of another'} (copies of one image, or "
        "links to it); each image's copies stay on one side of the split")
    if mixed:
        log(f"warning: {len(mixed)} images appear under two labels (identical files); check "
            "them, e.g. {}".format(", ".join(records[first[d]].rel for d in sorted(mixed)[:3])))
    return [r if root(r.group) == r.group else dataclasses.replace(r, group=root(r.group))
            for r in records]


def scan_report(root: Path, candidates: list[Record], cache: Cache,
                found: Scan | None = None) -> dict:
    """What the scan found. `skipped` lists files that could not be decoded, then what the scan
    left out (masks, hidden, unlisted...): one entry per file, or per folder with `files`."""
    counts = Counter(r.label or "(unlabelled)" for r in candidates)
    usable = Counter(r.label or "(unlabelled)" for r, ok in zip(candidates, cache.ok) if ok)
    unreadable = [{"path": r.rel, "reason": why}
                  for r, why in zip(candidates, cache.reasons) if why is not None]
    left_out = found.left_out if found is not None else []
    return {"root": str(root), "found": len(candidates), "usable": int(cache.ok.sum()),
            "classes_found": dict(counts), "classes": dict(usable),
            "skipped": unreadable + left_out, "unreadable": len(unreadable),
            "left_out": sum(e.get("files", 1) for e in left_out),
            "cache": str(cache.path)}


def save_data_files(ds: Dataset, run_dir: Path) -> None:
    """The scan report and the split, saved with every run."""
    save_json(ds.report, run_dir / "data_report.json")
    save_json(ds.split_dict(), run_dir / "split.json")
