"""`sstl cache`: a cache no run can read again is called stale and pruned; nothing else is."""
from __future__ import annotations

import os
import time
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from sstl.cli.main import app
from sstl.engine.config import DataConfig
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

    assert [e.name for e in prune(cache)] == [old]
    assert not any(cache.glob(f"{old}.*")) and _states(cache) == {new: "current"}
    written = (cache / f"{new}.npy").stat().st_mtime_ns
    _load(data, cache)  # the current one is still mapped, not decoded again
    assert _states(cache) == {new: "current"}
    assert (cache / f"{new}.npy").stat().st_mtime_ns == written


def test_entries_whose_files_are_all_gone_are_kept_and_orphans_pruned_only_when_old(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_pngs(data, n=3)
    _load(data, cache)
    [key] = _states(cache)
    for f in data.iterdir():  # unmounted, or another machine's folder: may come back
        f.unlink()
    young = cache / ("a" * 24 + ".npy")
    old = cache / ("b" * 24 + ".npy")
    young.write_bytes(b"x")
    old.write_bytes(b"x")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    assert _states(cache) == {key: "elsewhere", young.stem: "current", old.stem: "incomplete"}
    assert [e.name for e in prune(cache)] == [old.stem]
    assert (cache / f"{key}.npy").exists() and young.exists() and not old.exists()


def test_only_an_older_versions_demo_set_is_stale(tmp_path):
    from sstl.engine.data.synthetic import VERSION

    for v in (VERSION - 1, VERSION):
        (tmp_path / f"synthetic-v{v}" / "COVID").mkdir(parents=True)
        (tmp_path / f"synthetic-v{v}" / "COVID" / "a.png").write_bytes(b"png")
    assert _states(tmp_path) == {f"synthetic-v{VERSION - 1}": "stale",
                                 f"synthetic-v{VERSION}": "current"}
    assert [e.name for e in prune(tmp_path)] == [f"synthetic-v{VERSION - 1}"]
    assert (tmp_path / f"synthetic-v{VERSION}" / "COVID" / "a.png").exists()
    assert not (tmp_path / f"synthetic-v{VERSION - 1}").exists()


def test_cli_lists_and_prunes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = write_pngs(data, n=3)
    _load(data, cache)
    Image.new("L", (64, 64), 9).save(files[1])
    _load(data, cache)
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "--cache-dir", str(cache)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "stale" in listed.output and "current" in listed.output
    assert "1 stale or incomplete" in listed.output
    pruned = runner.invoke(app, ["cache", "--cache-dir", str(cache), "--prune"],
                           env={"COLUMNS": "200"})
    assert pruned.exit_code == 0, pruned.output
    assert "deleted 1 stale or incomplete entry" in pruned.output
    assert list(_states(cache).values()) == ["current"]
    missing = runner.invoke(app, ["cache", "--cache-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "is not a folder" in missing.output
