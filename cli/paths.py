"""Path options: a blank value is refused, not read as the current folder."""
from __future__ import annotations

from pathlib import Path

import typer


def path_value(value) -> Path:
    """typer's parser for every path option and argument.

    Path("") is Path("."): `--data "$DATA"` with DATA unset would scan, train on or write into
    whatever folder the shell is in. Defaults arrive already as paths and pass through."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("is blank (an unset shell variable?); name a path, or '.' for "
                                 "this folder")
    return Path(value)
