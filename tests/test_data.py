"""The data layer: scan, decode, cache, split. Oracles: hand-made files, properties, determinism."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sstl.engine.config import DataConfig
from sstl.engine.data import cache as cache_mod
from sstl.engine.data.dataset import load_dataset
from sstl.engine.data.index import DataError, find_records, load_gray
from sstl.engine.data.split import fraction_subset, split_test

from .conftest import CXR_SMALL, needs_shared


def _png(path: Path, arr: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _messy_folder(root: Path) -> Path:
    """Two classes (one with a space), good files of every format, and five bad ones."""
    rng = np.random.default_rng(0)
    for i in range(6):
        _png(root / "Class A" / f"a{i}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        _png(root / "Class B" / f"b{i}.jpg", rng.integers(0, 255, (48, 56, 3), dtype=np.uint8))
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 3 + 1000)
    Image.fromarray(deep).save(root / "Class A" / "deep16.png")  # 16-bit grey
    rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "Class B" / "rgba.png")
    good = (root / "Class A" / "a0.png").read_bytes()
    (root / "Class A" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "Class A" / "empty.png").write_bytes(b"")
    (root / "Class B" / "notes.png").write_text("this is not an image\n")
    _png(root / "Class B" / "icon.png", np.zeros((8, 8), dtype=np.uint8))
    return root


def test_scan_reports_and_skips_bad_files(tmp_path):
    root = _messy_folder(tmp_path / "data")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ds = load_dataset(DataConfig(path=str(root), cache_dir=str(tmp_path / "c"), cache_size=32),
                      log=lambda m: None)
    reasons = {s["path"]: s["reason"] for s in ds.report["skipped"]}
    assert set(reasons) == {"Class A/truncated.png", "Class A/empty.png", "Class B/notes.png",
                            "Class B/icon.png"}
    assert "truncated" in reasons["Class A/truncated.png"]
    assert "empty" in reasons["Class A/empty.png"]
    assert "not an image" in reasons["Class B/notes.png"]
    assert "too small" in reasons["Class B/icon.png"]
    assert ds.class_names == ["Class A", "Class B"]
    assert ds.report["classes"] == {"Class A": 7, "Class B": 7}
    assert ds.images.shape == (14, 32, 32) and ds.images.dtype == np.uint8
    # Nothing the user owns changed.
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_decode_16bit_and_rgba(tmp_path):
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 3 + 1000)
    Image.fromarray(deep).save(tmp_path / "d.png")
    g = load_gray(tmp_path / "d.png")
    expected = np.rint((deep - deep.min()) * (255.0 / (deep.max() - deep.min()))).astype(np.uint8)
    np.testing.assert_array_equal(g, expected)
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = np.arange(40, dtype=np.uint8) * 5, 0  # transparent: alpha ignored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "r.png")
    expected_luma = np.asarray(Image.fromarray(rgba[..., :3]).convert("L"))
    np.testing.assert_array_equal(load_gray(tmp_path / "r.png"), expected_luma)


def test_nested_images_folder_and_masks_are_skipped(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("COVID", "Normal"):
        for i in range(3):
            _png(tmp_path / cls / "images" / f"{i}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
            _png(tmp_path / cls / "masks" / f"{i}.png", np.zeros((40, 40), dtype=np.uint8))
    root, recs = find_records(tmp_path)
    assert sorted({r.label for r in recs}) == ["COVID", "Normal"]
    assert len(recs) == 6 and all("/images/" in r.rel for r in recs)


def test_unlabelled_folder_and_refusals(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(4):
        _png(tmp_path / "u" / f"{i}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    ds = load_dataset(DataConfig(path=str(tmp_path / "u"), cache_dir=str(tmp_path / "c"), cache_size=32),
                      log=lambda m: None)
    assert ds.class_names == [] and (ds.targets == -1).all()
    with pytest.raises(DataError, match="needs labels"):
        load_dataset(DataConfig(path=str(tmp_path / "u"), cache_dir=str(tmp_path / "c"), cache_size=32),
                     need_labels=True, log=lambda m: None)
    (tmp_path / "bad" / "X").mkdir(parents=True)
    (tmp_path / "bad" / "X" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 files"):
        load_dataset(DataConfig(path=str(tmp_path / "bad"), cache_dir=str(tmp_path / "c")), log=lambda m: None)
    _png(tmp_path / "bad" / "Y" / "ok.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    with pytest.raises(DataError, match="class 'X' has no usable image"):
        load_dataset(DataConfig(path=str(tmp_path / "bad"), cache_dir=str(tmp_path / "c")), log=lambda m: None)


def test_cache_is_reused_and_keyed_by_content(tmp_path, monkeypatch):
    root = _messy_folder(tmp_path / "data")
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "c"), cache_size=32)
    first = load_dataset(cfg, log=lambda m: None)

    decoded, real = [], cache_mod.decode_square

    def record(path, size):
        decoded.append(path)
        return real(path, size)

    monkeypatch.setattr(cache_mod, "decode_square", record)
    again = load_dataset(cfg, log=lambda m: None)
    np.testing.assert_array_equal(first.images, again.images)
    # Only the files that failed are tried again (a decoder may have been installed since).
    failed = {str(root.resolve() / e["path"]) for e in first.report["skipped"]}
    assert len(failed) == 4 and sorted(decoded) == sorted(failed)
    monkeypatch.undo()
    stripes = np.repeat(np.tile([7, 9], 32), 64).reshape(64, 64).astype(np.uint8)
    _png(root / "Class A" / "a0.png", stripes)  # content changes
    changed = load_dataset(cfg, log=lambda m: None)
    assert changed.report["cache"] != first.report["cache"]
    assert changed.images[0].min() >= 7 and changed.images[0].max() <= 9


def _check_split(labels, groups, is_test, frac):
    test_groups = {g for g, t in zip(groups, is_test) if t}
    train_groups = {g for g, t in zip(groups, is_test) if not t}
    assert not test_groups & train_groups, "a group straddles the split"
    for cls in set(labels):
        n = sum(1 for lab in labels if lab == cls)
        n_test = sum(1 for lab, t in zip(labels, is_test) if lab == cls and t)
        assert abs(n_test - frac * n) <= max(3, 0.05 * n), (cls, n_test, n)


def test_split_is_deterministic_stratified_and_group_aware():
    rng = np.random.default_rng(3)
    labels = list(rng.choice(["COVID", "Normal", "Viral"], size=500))
    groups = [f"p{rng.integers(0, 150)}-{lab}" for lab in labels]  # patients with 1..n images
    a = split_test(labels, groups, 0.2, seed=7)
    assert (a == split_test(labels, groups, 0.2, seed=7)).all()
    assert (a != split_test(labels, groups, 0.2, seed=8)).any()
    _check_split(labels, groups, a, 0.2)


def test_a_split_fixed_for_some_images_of_a_group_moves_the_whole_group():
    """A manifest may fix the split of only some rows: each group follows its fixed rows, so no
    patient straddles the split; a patient fixed to both sides is refused."""
    rng = np.random.default_rng(5)
    labels = list(rng.choice(["COVID", "Normal"], size=300))
    groups = [f"p{i // 3}" for i in range(300)]  # patients of 3 images
    fixed = [None] * 300
    for i in range(0, 300, 9):  # one image of every third patient fixed, alternately
        fixed[i] = "train" if (i // 9) % 2 else "test"
    is_test = split_test(labels, groups, 0.2, seed=0, fixed=fixed)
    for g in set(groups):
        sides = {bool(is_test[i]) for i in range(300) if groups[i] == g}
        assert len(sides) == 1, g
    for i, f in enumerate(fixed):
        if f is not None:
            assert all(is_test[j] == (f == "test") for j in range(300) if groups[j] == groups[i])
    fixed[1] = "train"  # p0: image 0 fixed to test, image 1 to train
    with pytest.raises(ValueError, match="both train and test.*p0"):
        split_test(labels, groups, 0.2, seed=0, fixed=fixed)


@needs_shared
def test_split_on_cxr_small_manifest():
    with open(CXR_SMALL / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    labels, groups = [r["label"] for r in rows], [r["group"] for r in rows]
    is_test = split_test(labels, groups, 0.2, seed=0)
    _check_split(labels, groups, is_test, 0.2)


def test_fractions_are_nested_stratified_and_inside_train():
    rng = np.random.default_rng(4)
    labels = list(rng.choice(["a", "b", "c", "d"], size=800))
    groups = [f"g{i // 2}-{lab}" for i, lab in enumerate(labels)]
    is_test = split_test(labels, groups, 0.2, seed=0)
    train = np.flatnonzero(~is_test)
    subsets = {f: fraction_subset(train, labels, groups, f, seed=1) for f in (0.01, 0.1, 0.5, 1.0)}
    assert set(subsets[1.0]) == set(train)
    for small, big in ((0.01, 0.1), (0.1, 0.5), (0.5, 1.0)):
        assert set(subsets[small]) <= set(subsets[big])
    for f, sub in subsets.items():
        assert not is_test[sub].any()
        assert (sub == fraction_subset(train, labels, groups, f, seed=1)).all()
        for cls in "abcd":
            n_cls = sum(1 for i in train if labels[i] == cls)
            got = sum(1 for i in sub if labels[i] == cls)
            # Whole groups (of 1 or 2 images here) until the class's share is reached.
            target = max(1, int(np.ceil(f * n_cls)))
            assert target <= got <= target + 1, (f, cls, got, target)
        sub_groups = {groups[i] for i in sub}
        assert all(groups[i] not in sub_groups for i in set(train) - set(sub)), "group cut"


def test_embedded_synthetic_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SSTL_CACHE", str(tmp_path))
    ds = load_dataset(DataConfig(cache_size=64), log=lambda m: None)
    assert ds.synthetic and len(ds.class_names) == 4
    assert len(ds.records) == 256 and not ds.report["skipped"]
    shutil.rmtree(tmp_path)
