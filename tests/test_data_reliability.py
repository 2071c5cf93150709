"""Data-layer reliability: nothing under --data vanishes silently, odd inputs get one-line
reasons, an interrupted cache build leaves nothing behind, and the user's files stay untouched.

Oracles: a tree walked independently of the scanner (every image file must be used or listed),
hand-written PNG headers, file hashes, and the cache folder's listing.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sstl.engine.config import DataConfig
from sstl.engine.data.cache import clear_stale_temporaries, load_or_build
from sstl.engine.data.dataset import load_dataset, save_data_files
from sstl.engine.data.index import IMAGE_SUFFIXES, DataError, decode_square, load_gray, scan

from .conftest import CXR_SMALL, needs_shared

RNG = np.random.default_rng(0)


def _png(path: Path, side: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (side, side), dtype=np.uint8)).save(path)
    return path


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit all-black PNG written by hand: 256 M pixels in ~140 kB, in ~0.05 s."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then packed bits
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def _all_image_files(root: Path) -> list[str]:
    """Every image file under root, links followed: the oracle the report is checked against."""
    out = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        out += [(Path(dirpath) / f).relative_to(root).as_posix() for f in files
                if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(out)


def _accounted(rel: str, used: set, skipped: list[dict]) -> bool:
    return rel in used or any(
        rel == e["path"] or ("files" in e and rel.startswith(e["path"] + "/")) for e in skipped)


def _load(root, tmp_path, **kw):
    logs = []
    ds = load_dataset(DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"), cache_size=32),
                      log=logs.append, **kw)
    return ds, logs


# 1. Every image under --data is used or reported ------------------------------------------

def test_images_beside_an_images_folder_are_used_and_the_rest_reported(tmp_path):
    root = tmp_path / "data"
    _png(root / "Normal" / "images" / "one.png")
    for i in range(40):
        _png(root / "Normal" / f"n{i:02d}.png")
    for i in range(3):  # the COVID-19 Radiography Database layout
        _png(root / "COVID" / "images" / f"c{i}.png")
        _png(root / "COVID" / "masks" / f"c{i}.png")
    _png(root / "stray.png")  # beside the class folders: no class
    (root / "Normal" / "._n00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS copy
    _png(root / "Normal" / ".ipynb_checkpoints" / "n00.png")
    _png(tmp_path / "elsewhere" / "e0.png"), _png(tmp_path / "elsewhere" / "e1.png")
    (root / "COVID" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    ds, logs = _load(root, tmp_path)
    assert ds.report["classes"] == {"COVID": 3, "Normal": 41}
    skipped = ds.report["skipped"]
    used = {r.rel for r in ds.records}
    missing = [f for f in _all_image_files(root) if not _accounted(f, used, skipped)]
    assert not missing, f"neither used nor reported: {missing}"
    by_path = {e["path"]: e for e in skipped}
    assert by_path["COVID/masks"] == {"path": "COVID/masks", "reason": "segmentation mask folder",
                                      "files": 3}
    assert by_path["stray.png"]["reason"] == "outside any class folder"
    assert by_path["Normal/._n00.png"]["reason"] == "hidden file"
    assert by_path["Normal/.ipynb_checkpoints"]["files"] == 1
    assert by_path["COVID/linked"]["files"] == 2 and "link" in by_path["COVID/linked"]["reason"]
    # Counted: what the report says was left out is every file not found as a candidate.
    assert ds.report["left_out"] == len(_all_image_files(root)) - ds.report["found"] == 8
    assert "8 image files left out" in logs[-1]
    # data_report.json keeps its old keys (and entries their path/reason).
    (tmp_path / "run").mkdir()
    save_data_files(ds, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert {"root", "found", "usable", "classes_found", "classes", "skipped", "cache"} <= set(saved)
    assert all({"path", "reason"} <= set(e) for e in saved["skipped"])


def test_every_suffix_pil_reads_radiographs_under_is_a_class_and_a_folder_without_images_is_named(
        tmp_path):
    """.jfif/.jpe (JPEG) and Netpbm files decode with PIL: a class of them must not vanish. A
    folder of other files is no class, and the log says so."""
    root = tmp_path / "data"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))
    for cls, suffix, fmt in (("A", ".png", "PNG"), ("B", ".jfif", "JPEG"), ("C", ".jpe", "JPEG"),
                             ("D", ".pgm", "PPM")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            img.save(root / cls / f"{i}{suffix}", format=fmt)
    (root / "E").mkdir()
    (root / "E" / "notes.txt").write_text("x")
    ds, logs = _load(root, tmp_path)
    assert ds.class_names == ["A", "B", "C", "D"] and len(ds.records) == 8
    assert any("folder 'E' holds no image file" in m and "'notes.txt'" in m for m in logs), logs
    assert _load(root, tmp_path, need_labels=True)[0].class_names == ["A", "B", "C", "D"]
    # Where labels count, an empty class folder (a copy that failed) is refused, not a model
    # short of that class; folders archives and file systems add are never classes.
    (root / "F").mkdir()
    with pytest.raises(DataError, match="folder 'F' beside the class folders is empty"):
        _load(root, tmp_path, need_labels=True)
    # Found by a user: the log first called it "no class", then the refusal a class: one
    # message now. Unlabelled use (pretraining) just says it is empty.
    logs = []
    with pytest.raises(DataError):
        load_dataset(DataConfig(path=str(root), cache_dir=str(tmp_path / "c")),
                     need_labels=True, log=logs.append)
    assert not any("'F'" in m for m in logs), logs
    assert "data: folder 'F' is empty" in _load(root, tmp_path)[1]
    (root / "F").rmdir()
    (root / "lost+found").mkdir()
    img.save(root / "A" / "extra.png")
    (root / "__MACOSX" / "A").mkdir(parents=True)
    img.save(root / "__MACOSX" / "A" / "._0.png", format="PNG")
    ds, logs = _load(root, tmp_path, need_labels=True)
    assert ds.class_names == ["A", "B", "C", "D"]
    assert {"path": "__MACOSX", "reason": "system folder (not data)", "files": 1} in \
        ds.report["skipped"]  # its file reported, not a class


def test_radiography_layout_without_loose_files_reports_only_masks(tmp_path):
    for cls in ("COVID", "Normal"):
        for i in range(2):
            _png(tmp_path / cls / "images" / f"{i}.png")
            _png(tmp_path / cls / "masks" / f"{i}.png")
    s = scan(tmp_path)
    assert [r.rel for r in s.records] == [f"{c}/images/{i}.png" for c in ("COVID", "Normal")
                                          for i in range(2)]
    assert s.left_out == [{"path": f"{c}/masks", "reason": "segmentation mask folder", "files": 2}
                          for c in ("COVID", "Normal")]


def test_manifest_reports_images_it_does_not_list(tmp_path):
    for i in range(4):
        _png(tmp_path / "A" / f"{i}.png")
    (tmp_path / "manifest.csv").write_text("path,label\nA/0.png,a\nA/1.png,a\n")
    s = scan(tmp_path)
    assert len(s.records) == 2
    assert s.left_out == [{"path": "A", "reason": "not listed in the manifest", "files": 2,
                           "first": "A/2.png"}]
    _png(tmp_path / ".hidden.png")  # found by a user: reported as path "." with no name
    assert scan(tmp_path).left_out[0] == {"path": ".", "reason": "not listed in the manifest",
                                          "files": 1, "first": ".hidden.png"}


def test_labels_spelt_two_ways_are_refused_not_made_two_classes(tmp_path):
    """Found by a user: `covid` beside `COVID` (or `Bacterial  Pneumonia` with two spaces)
    trained as classes of their own, silently, half the COVID images then counted as
    negatives. Where labels count, a manifest and class folders are refused alike; one
    spelling passes; pretraining, which uses no labels, is not refused."""
    for i in range(4):
        _png(tmp_path / "m" / f"{i}.png")
    rows = ["COVID", "covid", "Viral Pneumonia", "Viral  Pneumonia"]
    (tmp_path / "m" / "manifest.csv").write_text(
        "path,label\n" + "".join(f"{i}.png,{lab}\n" for i, lab in enumerate(rows)))
    with pytest.raises(DataError, match="differ only in case, spaces or underscores would be "
                       "separate classes: 'COVID' and 'covid'; 'Viral  Pneumonia' and "
                       "'Viral Pneumonia'; spell each class one way"):
        _load(tmp_path / "m", tmp_path, need_labels=True)
    assert len(_load(tmp_path / "m", tmp_path)[0].records) == 4  # unlabelled use: all images
    for name in ("Viral Pneumonia", "Viral_Pneumonia"):
        _png(tmp_path / "f" / name / "0.png")
    with pytest.raises(DataError, match="'Viral Pneumonia' and 'Viral_Pneumonia'"):
        _load(tmp_path / "f", tmp_path, need_labels=True)
    (tmp_path / "m" / "manifest.csv").write_text(
        "path,label\n" + "".join(f"{i}.png,{lab}\n" for i, lab in
                                 enumerate(["COVID", "COVID", "Normal", "normal pneumonia"])))
    assert _load(tmp_path / "m", tmp_path, need_labels=True)[0].class_names == [
        "COVID", "Normal", "normal pneumonia"]


def test_a_manifest_listing_no_images_says_so(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="manifest.csv: lists no images"):
        scan(tmp_path)


@needs_shared
def test_cxr_small_scans_clean():
    s = scan(CXR_SMALL)
    assert len(s.records) == 600 and s.left_out == []
    assert s.notes == ["manifest.csv: columns not used: source"]


# 2. Decompression bombs --------------------------------------------------------------------

def test_huge_image_is_reported_as_too_large(tmp_path):
    limit = 2 * Image.MAX_IMAGE_PIXELS
    square = _huge_png(tmp_path / "square.png", 16000, 16000)
    wide = _huge_png(tmp_path / "wide.png", 16000, 12000)  # W != H: the order is checked
    expected = rf"^too large \(16000 x 16000 pixels, limit {limit} pixels\)$"
    with pytest.raises(ValueError, match=expected):
        load_gray(square)
    img, why = decode_square(wide, 32)
    assert img is None and why == f"too large (16000 x 12000 pixels, limit {limit} pixels)"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_pillow_only_warns_about_is_refused_too(tmp_path):
    """Between Pillow's pixel limit and twice it, Pillow only warns, then decodes (hundreds of
    MB per scan thread): load_gray refuses it as too large, naming that limit."""
    limit = Image.MAX_IMAGE_PIXELS
    side = int(limit ** 0.5) + 100  # just over the limit, well under twice it
    f = _huge_png(tmp_path / "big.png", side, side)
    with pytest.raises(ValueError, match=rf"^too large \({side} x {side} pixels, limit {limit} "):
        load_gray(f)


# 3. Partly labelled manifests --------------------------------------------------------------

def test_manifest_with_some_empty_labels(tmp_path):
    rows = ["path,label"]
    for i in range(6):
        _png(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'' if i in (1, 4) else 'Normal' if i % 2 else 'COVID'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        _load(tmp_path, tmp_path, need_labels=True)
    msg = str(e.value)
    assert "2 of 6 manifest rows have no label (first: 1.png, 4.png)" in msg and "\n" not in msg
    ds, _ = _load(tmp_path, tmp_path)  # pretraining needs no labels: still fine
    assert len(ds.records) == 6 and ds.class_names == []

def test_a_manifest_that_is_not_utf8_is_an_error_naming_the_line(tmp_path):
    root = tmp_path / "data"
    (root / "A").mkdir(parents=True)
    rows = "".join(f"A/{i}.png,A\n" for i in range(2000))  # past the reader's first chunk
    (root / "manifest.csv").write_bytes(f"path,label\n{rows}A/r\u00e9sum\u00e9.png,A\n"
                                        .encode("cp1252"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 on line 2002\).*CSV UTF-8"):
        _load(root, tmp_path)


# 4. Manifest headers -----------------------------------------------------------------------

@pytest.mark.parametrize("column", ["lable", "labels", "class", "Diagnosis"])
def test_misspelt_label_column_is_an_error(tmp_path, column):
    _png(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text(f"path,{column}\na.png,COVID\n")
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    msg = str(e.value)
    assert f"unknown column {column!r} (did you mean 'label'?)" in msg
    assert "path, label, group, split" in msg and "\n" not in msg


def test_header_case_bom_and_extra_columns(tmp_path):
    _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    (tmp_path / "manifest.csv").write_text(
        "\ufeffPath, Label ,GROUP,Split,age\na.png,COVID,p1,test,71\nb.png,Normal,p2,train,40\n",
        encoding="utf-8")
    s = scan(tmp_path)
    assert [(r.rel, r.label, r.group, r.split) for r in s.records] == [
        ("a.png", "COVID", "p1", "test"), ("b.png", "Normal", "p2", "train")]
    assert s.notes == ["manifest.csv: columns not used: age"]
    (tmp_path / "manifest.csv").write_text("filename,label\na.png,COVID\n")
    with pytest.raises(DataError, match=r"'filename' \(did you mean 'path'\?\)"):
        scan(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label,Label\na.png,COVID,COVID\n")
    with pytest.raises(DataError, match="'label' appears twice"):
        scan(tmp_path)


# 5. Cache temporaries ----------------------------------------------------------------------

def _records(tmp_path, n=24):
    for i in range(n):
        _png(tmp_path / "u" / f"{i:02d}.png")
    return scan(tmp_path / "u").records


def test_a_cache_folder_that_cannot_take_a_build_is_one_line(tmp_path, monkeypatch):
    """A read-only cache folder (shared caches are read from such) that lacks this data's
    cache: one line naming the folder and the way out, not a traceback from the clean-up
    (whose own unlink fails there too). A place no folder can be made: one line as well."""
    import errno

    from sstl.engine.config import ConfigError, check
    from sstl.engine.data import cache

    from .configs import pretrain_cfg

    for i in range(2):
        _png(tmp_path / "d" / f"{i}.png")
    records = scan(tmp_path / "d").records
    real_unlink = Path.unlink

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def unlink(self, *a, **k):
        if ".tmp" in self.name:
            read_only()
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(cache.np.lib.format, "open_memmap", read_only)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(DataError, match=r"could not build the decode cache in .*/c: Read-only "
                                        r"file system; choose another --cache-dir"):
        load_or_build(records, 32, tmp_path / "c")
    monkeypatch.undo()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match=r"cache folder .*a_file/c: .*choose another --cache-dir"):
        load_or_build(records, 32, tmp_path / "a_file" / "c")
    monkeypatch.setenv("SSTL_CACHE", str(tmp_path / "a_file"))
    with pytest.raises(ConfigError, match=r"\$SSTL_CACHE .*a_file: a file is in the way"):
        check(pretrain_cfg())
    check(pretrain_cfg(cache_dir=str(tmp_path / "c")))  # --cache-dir overrides it


def test_interrupted_cache_build_leaves_no_temporaries(tmp_path):
    records, cache_dir = _records(tmp_path), tmp_path / "cache"
    calls = []

    def ctrl_c(done, total):
        calls.append(done)
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_or_build(records, 32, cache_dir, workers=2, progress=ctrl_c)
    assert calls == [1, 2, 3]
    assert sorted(p.name for p in cache_dir.iterdir()) == []
    cache = load_or_build(records, 32, cache_dir, workers=2)  # and the next run builds cleanly
    assert cache.ok.all() and sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]


def test_stale_temporaries_of_dead_processes_are_cleared(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process (reuse within the test is vanishingly rare)
    host = socket.gethostname()
    stale = [f"k1.npy.tmp{dead.pid}", f"k1.json.tmp{dead.pid}@{host}",  # earlier versions'
             f".k4.npy.tmp{dead.pid}@{host}"]  # today's (io.temp_path): hidden
    kept = [f"k2.npy.tmp{os.getppid()}@{host}",  # a live process: maybe building right now
            f".k2.json.tmp{os.getppid()}@{host}",
            f"k3.npy.tmp{dead.pid}@another-host",  # a shared folder: pids of elsewhere
            f".k3.json.tmp{dead.pid}@another-host", "notes.tmpfile"]
    for name in stale + kept:
        (cache_dir / name).write_bytes(b"x")
    drawing = cache_dir / f"synthetic-v1.tmp{dead.pid}"  # the demo set's folder, cut short
    (drawing / "COVID").mkdir(parents=True)
    (drawing / "COVID" / "synthetic_000.png").write_bytes(b"x")
    stale.append(drawing.name)
    hidden = cache_dir / f".synthetic-v2.tmp{dead.pid}@{host}"  # today's drawing folder
    (hidden / "COVID").mkdir(parents=True)
    stale.append(hidden.name)
    load_or_build(_records(tmp_path, 2), 32, cache_dir)
    assert all((cache_dir / k).exists() for k in kept)
    assert not any((cache_dir / s).exists() for s in stale)
    assert clear_stale_temporaries(cache_dir) == ([], [])


def test_demo_set_interrupted_while_drawn_leaves_nothing(tmp_path, monkeypatch):
    from sstl.engine.data import synthetic

    drawn = []

    def ctrl_c(cls, rng):
        drawn.append(cls)
        if len(drawn) == 3:
            raise KeyboardInterrupt
        return np.zeros((8, 8), np.uint8)

    monkeypatch.setattr(synthetic, "draw", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(tmp_path / "demo", per_class=2)
    assert len(drawn) == 3 and list(tmp_path.iterdir()) == []


def test_byte_identical_copies_land_on_one_side_of_the_split(tmp_path):
    """Copies under other names (and in another group of the manifest) join one group, so no
    image is both trained on and tested on. Oracle: the files' own bytes, hashed here."""
    import shutil

    from .tiny_run import write_pngs

    root = tmp_path / "data"
    for cls in ("A", "B"):
        files = write_pngs(root / cls, n=16, seed=ord(cls))
        for f in files[:8]:
            shutil.copy(f, f.with_name(f"copy-{f.name}"))
    logs = []
    for seed in range(4):  # a chance split could keep the copies together: several seeds
        ds = load_dataset(DataConfig(path=str(root), cache_dir=str(tmp_path / "c"),
                                     cache_size=32, split_seed=seed), log=logs.append)
        side: dict[str, set] = {}
        for r, t in zip(ds.records, ds.is_test):
            side.setdefault(hashlib.sha256(open(r.path, "rb").read()).hexdigest(), set()).add(t)
        assert len(side) == 32 and all(len(s) == 1 for s in side.values()), seed
    assert any("16 files are byte-identical copies" in m for m in logs)


# 6. The user's files are never modified ----------------------------------------------------

def _fingerprint(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                            p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_scanning_never_modifies_the_data(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        _png(root / "A" / f"{i}.png"), _png(root / "B" / "images" / f"{i}.png")
        _png(root / "B" / "masks" / f"{i}.png")
    good = (root / "A" / "0.png").read_bytes()
    (root / "A" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "A" / "empty.png").write_bytes(b"")
    (root / "B" / "text.jpg").write_text("not an image\n")
    _huge_png(root / "B" / "huge.png", 16000, 16000)
    _png(root / "B" / "icon.png", side=8)
    before = _fingerprint(root)
    first, _ = _load(root, tmp_path)
    again, _ = _load(root, tmp_path)  # from the cache
    assert _fingerprint(root) == before
    reasons = {e["path"]: e["reason"] for e in first.report["skipped"]}
    assert reasons["B/huge.png"].startswith("too large (16000 x 16000 pixels")
    assert {"A/truncated.png", "A/empty.png", "B/text.jpg", "B/icon.png", "B/masks"} <= set(reasons)
    assert first.report == again.report


def test_top_level_masks_and_linked_folders_are_not_classes(tmp_path):
    """The rules for masks/ and links hold at the top level too: `masks/` beside `images/`
    is no class, and a linked class folder would read its images twice."""
    root = tmp_path / "data"
    for c in ("COVID", "Normal", "masks"):
        for i in range(2):
            _png(root / c / f"{i}.png")
    (root / "Normal_link").symlink_to(root / "Normal", target_is_directory=True)
    s = scan(root)
    assert sorted({r.label for r in s.records}) == ["COVID", "Normal"]
    assert len(s.records) == 4
    assert {(e["path"], e["reason"], e["files"]) for e in s.left_out} == {
        ("masks", "segmentation mask folder", 2), ("Normal_link", "link to a folder (not followed)", 2)}


def test_unreadable_folders_are_reported_not_skipped(tmp_path, monkeypatch):
    """A folder that cannot be listed (permissions, a lost mount) is a left-out entry with
    its reason, in a training scan and in predict's rows; a whole class too. (Root reads
    through chmod 000, so the refusal is made by os.scandir here.)"""
    from sstl.engine.predict import image_files

    root = tmp_path / "data"
    for c in ("COVID", "Normal", "Lung_Opacity"):
        _png(root / c / "0.png")
    _png(root / "COVID" / "more" / "1.png")
    real = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path).name in ("more", "Lung_Opacity"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    s = scan(root)
    assert sorted(r.rel for r in s.records) == ["COVID/0.png", "Normal/0.png"]
    assert {(e["path"], e["reason"]) for e in s.left_out} == {
        ("COVID/more", "unreadable folder (Permission denied)"),
        ("Lung_Opacity", "unreadable folder (Permission denied)")}
    assert not any("Lung_Opacity" in n for n in s.notes)  # not also "holds no image file"
    rows = dict(image_files([str(root / "COVID")]))
    assert rows == {str(root / "COVID" / "0.png"): None, str(root / "COVID" / "more"):
                    "left out: unreadable folder (Permission denied)"}


@pytest.mark.parametrize("second", ["./x/1.png", "x//1.png", "x\\1.png", "ABS", "../d/x/1.png",
                                    "link/1.png"])
def test_a_manifest_listing_one_file_twice_is_an_error(tmp_path, second):
    """However the second row names the file (absolute, through ../, through a link)."""
    d = tmp_path / "d"
    _png(d / "x" / "1.png"), _png(d / "x" / "2.png")
    (d / "link").symlink_to(d / "x", target_is_directory=True)
    second = str(d / "x" / "1.png") if second == "ABS" else second
    (d / "manifest.csv").write_text(f"path,label\nx/1.png,a\n\nx/2.png,b\n{second},a\n")
    with pytest.raises(DataError, match=r"is listed twice \(lines 2 and 5"):
        scan(d / "manifest.csv")


def test_an_absolute_manifest_path_stays_as_written(tmp_path):
    """A row's path names the file in split.json and the data fingerprint: respelled, runs
    made from the manifest before would read as made from other data."""
    _png(tmp_path / "x" / "1.png")
    (tmp_path / "manifest.csv").write_text(f"path,label\n{tmp_path / 'x' / '1.png'},a\n")
    assert [r.rel for r in scan(tmp_path / "manifest.csv").records] == [
        (tmp_path / "x" / "1.png").as_posix()]


def test_a_manifest_row_without_a_path_is_an_error(tmp_path):
    _png(tmp_path / "x" / "1.png")
    (tmp_path / "manifest.csv").write_text("path,label\nx/1.png,a\n,b\n")
    with pytest.raises(DataError, match="line 3 has no path"):
        scan(tmp_path / "manifest.csv")


@pytest.mark.parametrize("bad, line", [('"x/2.png,b\n', 3), ('"x/2.png"b,c\nx/3.png,a\n', 3)])
def test_a_manifest_with_a_broken_quote_is_an_error_naming_the_line(tmp_path, bad, line):
    """csv alone reads an unclosed quote to the end of the file as one field: a path that
    then 'does not exist', and every row after it lost."""
    _png(tmp_path / "x" / "1.png")
    (tmp_path / "manifest.csv").write_text(f"path,label\nx/1.png,a\n{bad}")
    with pytest.raises(DataError, match=rf"manifest.csv: not valid CSV on line {line} .*quotes"):
        scan(tmp_path / "manifest.csv")


def test_files_that_failed_to_decode_are_retried_from_a_cached_build(tmp_path, monkeypatch):
    """A skip whose cause went away (a decoder installed since) must not last: the cache's
    key covers the files, not the machine."""
    import sstl.engine.data.cache as cache

    records = _records(tmp_path, n=6)
    real = cache.decode_square
    monkeypatch.setattr(cache, "decode_square", lambda path, size: (
        (None, "needs a decoder: pip install x") if path.endswith("3.png") else real(path, size)))
    first = load_or_build(records, 32, tmp_path / "c")
    assert first.ok.tolist() == [True, True, True, False, True, True]
    monkeypatch.setattr(cache, "decode_square", real)
    second = load_or_build(records, 32, tmp_path / "c")
    assert second.key == first.key and second.ok.all() and second.reasons[3] is None
    np.testing.assert_array_equal(second.images[3], real(records[3].path, 32)[0])
    third = load_or_build(records, 32, tmp_path / "c")  # persisted: nothing left to retry
    assert third.ok.all()
    np.testing.assert_array_equal(np.asarray(third.images), np.asarray(second.images))


def test_the_cache_never_serves_pixels_of_a_file_that_was_replaced(tmp_path):
    """Two same-size images swapped by rename with their mtimes kept (how one fixes a
    mislabelled pair; tar, cp -p and rsync -t keep mtimes too): same paths, sizes and mtimes,
    new ctimes.
    Oracle: a fresh decode of every file; the cache must agree after the swap."""
    records = _records(tmp_path, n=4)
    a, b = Path(records[0].path), Path(records[1].path)
    assert a.stat().st_size == b.stat().st_size
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    first = load_or_build(records, 32, tmp_path / "c")
    time.sleep(0.05)  # past the file system's timestamp granularity
    os.replace(a, tmp_path / "tmp.png")
    os.replace(b, a)
    os.replace(tmp_path / "tmp.png", b)
    second = load_or_build(records, 32, tmp_path / "c")
    assert second.key != first.key
    for i, r in enumerate(records):
        np.testing.assert_array_equal(second.images[i], decode_square(r.path, 32)[0])
    assert second.digests[:2] == first.digests[1::-1]


def test_a_changed_decoder_makes_a_new_cache(tmp_path, monkeypatch):
    """Pixels an earlier decoder made (before a DICOM fix, say) are never served by a later
    one: the decoder's identity is part of the key."""
    import sstl.engine.data.cache as cache

    from importlib import metadata

    from sstl.engine.data import index

    records = _records(tmp_path, n=2)
    before = cache.cache_key(records, 32)

    def key_with(*patches) -> str:  # the key with the decoder's inputs patched, computed anew
        with monkeypatch.context() as m:
            for target, name, value in patches:
                m.setattr(target, name, value)
            cache.decoder_identity.cache_clear()
            try:
                return cache.cache_key(records, 32)
            finally:
                cache.decoder_identity.cache_clear()

    real_version = metadata.version
    newer_pillow = (metadata, "version",
                    lambda pkg: "999.0" if pkg.lower() == "pillow" else real_version(pkg))

    def load_gray(path):  # another body: the source, hence the decoder, differs
        raise NotImplementedError(path)
    other_code = (index, "load_gray", load_gray)
    assert key_with() == before  # the same decoder: the same key
    assert key_with(newer_pillow) != before
    assert key_with(other_code) != before


def test_a_16_bit_colour_png_is_a_reason_not_a_black_image(tmp_path):
    """Pillow reads 48-bit RGB as 8 bits by dropping each low byte: a 12-bit radiograph in it
    came out 0..15. Refused with a reason; the same pixels as 16-bit grey are stretched."""
    g = np.random.default_rng(0).integers(0, 4096, (48, 40)).astype(np.uint16)

    def png(path, a, colour_type, channels):
        rows = a.reshape(a.shape[0], -1)
        raw = b"".join(b"\0" + r.astype(">u2").tobytes() for r in rows)

        def chunk(kind, data):
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
        ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, colour_type, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        return path
    _, why = decode_square(png(tmp_path / "rgb16.png", np.dstack([g, g, g]), 2, 3), 48)
    assert why.startswith("16 bits per channel in a colour image (RGB;16B;")
    _, why = decode_square(png(tmp_path / "la16.png", np.dstack([g, g]), 4, 2), 48)
    assert why.startswith("16 bits per channel in a grey+alpha image (LA;16B;"), why
    grey = load_gray(png(tmp_path / "grey16.png", g, 0, 1))
    want = np.rint((g - g.min()) * 255.0 / (g.max() - g.min())).astype(np.uint8)
    np.testing.assert_array_equal(grey, want)
