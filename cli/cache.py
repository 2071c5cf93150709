"""`sstl cache`: what the decode-once cache folder holds, and pruning what no run can read."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sstl.cli.paths import path_value
from sstl.engine.config import CacheConfig
from sstl.engine.runs import Output


def cache(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Decode-once cache "
                                             "\\[default: $SSTL_CACHE or ~/.cache/sstl]",
                                             parser=path_value),
    prune: bool = typer.Option(CacheConfig.prune, "--prune", help="Delete the stale and incomplete "
                               "entries (no sstl can read them); current ones, other sstl "
                               "versions' and those whose files are elsewhere stay"),
    other_versions: bool = typer.Option(CacheConfig.other_versions, "--other-versions", help="With --prune, also "
                                        "delete the caches another sstl version or decoder "
                                        "made (an install sharing this folder would decode "
                                        "again)"),
):
    """List the decoded-image caches: size, files, state; --prune deletes the stale ones."""
    from sstl.engine.config import check

    run(check(CacheConfig(cache_dir=str(cache_dir) if cache_dir else None, prune=prune,
                          other_versions=other_versions)))


def run(cfg: CacheConfig) -> None:
    """The table of cfg's cache folder, after pruning it when asked."""
    from sstl.engine.data.cache import default_cache_dir
    from sstl.engine.data.cachedir import entries, prune as prune_folder, temporaries_bytes

    folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    console = Output()
    if cfg.prune:
        gone, failed, temporaries = prune_folder(folder, cfg.other_versions)
        console.print(f"deleted {_count(gone)} of {folder}, {_mb(sum(e.bytes for e in gone))}"
                      + (f", and dead builds' temporaries, {_mb(temporaries)}" if temporaries
                         else ""), markup=False)
        for why in failed:
            console.print(f"could not delete {why}", markup=False)
    found = entries(folder)
    table = Table(title=f"{folder}", title_justify="left")
    for col in ("entry", "state", "images", "side", "size", "written"):
        table.add_column(col, no_wrap=True,
                         justify="right" if col in ("images", "side", "size") else "left")
    table.add_column("files under", overflow="fold")
    for e in found:
        table.add_row(e.name[:12], e.state, str(e.images or ""), str(e.side or ""), _mb(e.bytes),
                      time.strftime("%Y-%m-%d", time.localtime(e.written)), e.root)
    console.print(table)
    stale = [e for e in found if e.prunable]
    other = [e for e in found if e.state == "other sstl"]
    line = f"{_count(found)}, {_mb(sum(e.bytes for e in found))}"
    if stale:
        line += (f"; {len(stale)} stale or incomplete ({_mb(sum(e.bytes for e in stale))}): "
                 "`sstl cache --prune` deletes them")
    if other:
        line += (f"; {len(other)} made by another sstl version or decoder "
                 f"({_mb(sum(e.bytes for e in other))}): `--prune --other-versions` deletes them "
                 "too")
    temporaries = temporaries_bytes(folder) if folder.is_dir() else 0
    if temporaries:
        line += (f"; temporaries of builds that were killed ({_mb(temporaries)}): "
                 "`sstl cache --prune` deletes them")
    console.print(line, markup=False)


def _count(found: list) -> str:
    return f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}"


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"
