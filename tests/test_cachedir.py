"""`sstl cache`: a cache no sstl can read again is stale and pruned; what another install,
user or machine may still read is kept (the default folder is shared by all of them)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import sstl.engine.data.cache as cache_mod
from sstl.cli.main import app
from sstl.engine.config import DataConfig
from sstl.engine.data import cachedir
from sstl.engine.data.cachedir import entries, prune
from sstl.engine.data.dataset import load_dataset

from .tiny_run import write_pngs


def _load(root: Path, cache: Path):
    logs: list[str] = []
    ds = load_dataset(DataConfig(path=str(root), cache_dir=str(cache), cache_size=32),
                      log=logs.append)
    return ds, logs


def _states(cache: Path) -> dict[str, str]:
    return {e.name: e.state for e in entries(cache)}


def _names(gone_failed) -> list[str]:
    gone, failed, _ = gone_failed
    assert failed == []
    return sorted(e.name for e in gone)


def test_an_edited_file_leaves_one_stale_cache_which_prune_deletes_and_nothing_else(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = write_pngs(data, n=4)
    _, logs = _load(data, cache)
    [old] = _states(cache)
    assert _states(cache) == {old: "current"} and not any("stale" in m for m in logs)

    Image.new("L", (64, 64), 7).save(files[0])  # edited in place: a new key, a new cache
    _, logs = _load(data, cache)
    [new] = set(_states(cache)) - {old}
    assert _states(cache) == {old: "stale", new: "current"}
    assert any("1 stale cache" in m and "sstl cache --prune" in m for m in logs)

    assert _names(prune(cache)) == [old]
    assert not any(cache.glob(f"{old}.*")) and _states(cache) == {new: "current"}
    written = (cache / f"{new}.npy").stat().st_mtime_ns
    _load(data, cache)  # the current one is still mapped, not decoded again
    assert _states(cache) == {new: "current"}
    assert (cache / f"{new}.npy").stat().st_mtime_ns == written


def test_another_decoders_cache_is_kept_unless_asked_and_then_stale_once_its_files_change(
        tmp_path, monkeypatch):
    """Two installs (another Pillow, another sstl) share the folder: each one's cache of the
    same unchanged files is the other's "other sstl", never stale."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = write_pngs(data, n=3)
    with monkeypatch.context() as m:
        m.setattr(cache_mod, "decoder_identity", lambda: "another install's decoder")
        _load(data, cache)
    [theirs] = _states(cache)
    _load(data, cache)
    [mine] = set(_states(cache)) - {theirs}
    assert _states(cache) == {theirs: "other sstl", mine: "current"}
    assert _names(prune(cache)) == [] and len(_states(cache)) == 2
    Image.new("L", (64, 64), 3).save(files[2])  # now neither install can read either
    assert _states(cache) == {theirs: "stale", mine: "stale"}

    # A cache written before caches recorded their decoder cannot be judged: kept too.
    meta = cache / f"{mine}.json"
    info = json.loads(meta.read_text())
    del info["decoder"]
    meta.write_text(json.dumps(info))
    assert _states(cache)[mine] == "other sstl"
    assert _names(prune(cache, other_versions=True)) == sorted([theirs, mine])


def test_files_absent_or_unreadable_here_keep_their_cache(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = write_pngs(data, n=3)
    _load(data, cache)
    [key] = _states(cache)
    real_stat = os.stat

    def denied(path, *a, **kw):  # another user's folder (this test may run as root)
        if str(path) == str(files[1]):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(cachedir.os, "stat", denied)
        assert _states(cache) == {key: "elsewhere"}
        assert _names(prune(cache)) == []
    for f in files:  # unmounted, or another machine's folder: may come back
        f.unlink()
    assert _states(cache) == {key: "elsewhere"} and _names(prune(cache)) == []


def test_orphans_are_building_when_young_and_incomplete_when_old(tmp_path):
    young, old, lone_json = (tmp_path / f"{c * 24}.{s}" for c, s in (("a", "npy"), ("b", "npy"),
                                                                        ("c", "json")))
    for f in (young, old, lone_json):
        f.write_bytes(b"x")
    for f in (old, lone_json):
        hours_ago = time.time() - 7200
        os.utime(f, (hours_ago, hours_ago))
    assert _states(tmp_path) == {young.stem: "building", old.stem: "incomplete",
                                 lone_json.stem: "incomplete"}
    assert _names(prune(tmp_path)) == sorted([old.stem, lone_json.stem])
    assert young.exists() and not old.exists() and not lone_json.exists()


def _draw(folder: Path, version: int, monkeypatch) -> set[str]:
    """A demo set of that sstl version drawn into `folder` (a cache folder) and cached there;
    returns the names of everything in the folder."""
    from sstl.engine.data import synthetic

    monkeypatch.setattr(synthetic, "VERSION", version)
    drawn = synthetic.ensure_synthetic(folder / f"synthetic-v{version}", per_class=2)
    _load(drawn, folder)
    return {e.name for e in entries(folder)}


def test_other_versions_demo_sets_are_kept_unless_asked_and_then_go_with_their_caches(
        tmp_path, monkeypatch):
    older = _draw(tmp_path, 1, monkeypatch)
    newer = _draw(tmp_path, 3, monkeypatch) - older
    both = _draw(tmp_path, 2, monkeypatch) - older - newer  # this install: version 2
    states = _states(tmp_path)
    assert {states[n] for n in both} == {"current"}
    assert states["synthetic-v1"] == states["synthetic-v3"] == "other sstl"  # an install's
    assert _names(prune(tmp_path)) == []
    # Their caches go in the second pass, their files being gone: stale.
    assert set(_names(prune(tmp_path, other_versions=True))) == older | newer
    assert set(_states(tmp_path)) == both and set(_states(tmp_path).values()) == {"current"}


def test_a_symlinked_cache_folder_still_knows_its_demo_sets_caches(tmp_path, monkeypatch):
    import shutil

    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    names = _draw(link, 1, monkeypatch)
    shutil.rmtree(link / "synthetic-v1")  # a new draw would make new files: never read again
    assert set(_states(link).values()) == {"stale"} and set(_states(link)) == names - {
        "synthetic-v1"}


def test_another_machines_cache_is_not_judged_here(tmp_path, monkeypatch):
    """A shared folder, data at the same path on two machines (copies: other ctimes): the
    key of the other's cache does not come out here, yet its files may be unchanged there."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = write_pngs(data, n=3)
    with monkeypatch.context() as m:
        m.setattr(cache_mod.socket, "gethostname", lambda: "another-node")
        _load(data, cache)
    [theirs] = _states(cache)
    Image.new("L", (64, 64), 5).save(files[0])
    assert _states(cache) == {theirs: "elsewhere"} and _names(prune(cache)) == []


def test_a_listing_that_went_stale_is_rechecked_before_deleting(tmp_path, monkeypatch):
    """A rebuild may complete an entry between prune's listing and its deletion: the entry is
    read again first and spared."""
    orphan = tmp_path / ("d" * 24 + ".npy")
    orphan.write_bytes(b"x")
    os.utime(orphan, (time.time() - 7200,) * 2)
    snapshot = entries(tmp_path)
    assert [e.state for e in snapshot] == ["incomplete"]
    os.utime(orphan, None)  # written again since (now "building")
    monkeypatch.setattr(cachedir, "entries", lambda folder: snapshot)
    assert _names(prune(tmp_path)) == [] and orphan.exists()


def test_a_file_name_that_is_not_utf8_is_cached_and_listed(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_pngs(data, n=3)
    odd = os.fsdecode(b"Neumon\xeda.png")  # Latin-1 bytes, as an old archive may hold
    (data / "img0.png").rename(data / odd)
    ds, _ = _load(data, cache)
    assert sorted(Path(r.path).name for r in ds.records) == sorted(["img1.png", "img2.png", odd])
    assert list(_states(cache).values()) == ["current"]


def test_a_file_prune_may_not_delete_is_reported_and_the_rest_go_on(tmp_path, monkeypatch):
    young, old = tmp_path / ("a" * 24 + ".npy"), tmp_path / ("b" * 24 + ".npy")
    for f in (young, old):
        f.write_bytes(b"x")
        os.utime(f, (time.time() - 7200,) * 2)
    real_unlink = Path.unlink

    def unlink(self, *a, **kw):
        if self == young:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, *a, **kw)
    monkeypatch.setattr(Path, "unlink", unlink)
    gone, failed, _ = prune(tmp_path)
    assert [e.name for e in gone] == [old.stem] and young.exists() and not old.exists()
    assert failed == [f"{young.stem}: Operation not permitted"]


def test_a_dead_temporary_prune_may_not_delete_is_reported(tmp_path, monkeypatch):
    """Another user's dead build in a shared folder: its temporary is named in `failed`
    (no traceback) and its bytes are not counted as freed; one that goes is counted."""
    import socket

    host = socket.gethostname()
    theirs, ours = (tmp_path / f".{c * 24}.npy.tmp9999999{n}@{host}" for c, n in (("a", 8),
                                                                                  ("b", 9)))
    theirs.write_bytes(b"x" * 1000)
    ours.write_bytes(b"x" * 300)
    real = cache_mod.remove  # what clears temporaries (clear_stale_temporaries)

    def remove(p):
        if p == theirs:
            raise PermissionError(1, "Operation not permitted", str(p))
        return real(p)
    monkeypatch.setattr(cache_mod, "remove", remove)
    gone, failed, freed = prune(tmp_path)
    assert gone == [] and failed == [f"{theirs.name}: Operation not permitted"]
    assert freed == 300 and theirs.exists() and not ours.exists()


def test_cli_lists_and_prunes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = write_pngs(data, n=3)
    _load(data, cache)
    Image.new("L", (64, 64), 9).save(files[1])
    _load(data, cache)
    import socket  # a build killed mid-write left its temporary (a whole cache, at worst)
    dead = cache / f".{'c' * 24}.npy.tmp99999999@{socket.gethostname()}"
    dead.write_bytes(b"x" * 2**21)
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "--cache-dir", str(cache)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "stale" in listed.output and "current" in listed.output
    assert "1 stale or incomplete" in listed.output
    assert "temporaries of builds that were killed (2.0 MB)" in listed.output
    pruned = runner.invoke(app, ["cache", "--cache-dir", str(cache), "--prune"],
                           env={"COLUMNS": "200"})
    assert pruned.exit_code == 0, pruned.output
    assert "deleted 1 entry" in pruned.output and "temporaries, 2.0 MB" in pruned.output
    assert not dead.exists() and "temporaries" not in pruned.output.splitlines()[-1]
    assert list(_states(cache).values()) == ["current"]
    missing = runner.invoke(app, ["cache", "--cache-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "is not a folder" in missing.output
    alone = runner.invoke(app, ["cache", "--cache-dir", str(cache), "--other-versions"])
    assert alone.exit_code != 0 and "goes with --prune" in alone.output


@pytest.fixture(autouse=True)
def _fresh_decoder_identity():
    cache_mod.decoder_identity.cache_clear()
    yield
    cache_mod.decoder_identity.cache_clear()
