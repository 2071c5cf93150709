"""Which run a config is: its fingerprint, its resume key, and how a recorded config differs.

A checkpoint must match the resume key to be continued: the config minus how and where it
runs (config.RESUMABLE_RUNTIME) and minus what only changes the report (config.REPORT_ONLY).
Paths count by the place they name. The keys earlier versions wrote are still accepted
(resume_keys), and a run whose inputs only moved is recognised (only_moved).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from .config import REPORT_ONLY, RESUMABLE_RUNTIME, auto_precision, to_dict
from .models import is_start_file


def config_hash(cfg) -> str:
    """A short stable fingerprint of a config (or its dict), stored with what is made from it."""
    blob = json.dumps(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=True,
                      default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resume_key(cfg, as_typed: bool = False, encoder_as_file: bool = False,
               precision_as_typed: bool = False) -> str:
    """What a checkpoint must match to be continued: the config minus how and where it runs,
    and minus what only changes the report (set to its default, so keys made before stay).
    Paths (--data, --encoder, --init PATH) count by the place they name, not by how they were
    typed: `cxr`, `./cxr` and /abs/cxr, from any folder, are one run, and so are an encoder's
    run directory and its encoder.safetensors. The keys of checkpoints written before, which
    resume still accepts, newest last: `precision_as_typed` (--precision bf16 on a GPU, or
    fp32 on a CPU, not yet counted as auto), `encoder_as_file` (also an encoder file not yet
    counted as its directory), `as_typed` (also paths as typed)."""
    return config_hash(_keyed(to_dict(cfg), cfg, as_typed, encoder_as_file, precision_as_typed))


def _keyed(d: dict, cfg, as_typed: bool = False, encoder_as_file: bool = False,
           precision_as_typed: bool = False) -> dict:
    """The part of a config's dict (a config.json's too) that the resume key counts."""
    d = json.loads(json.dumps(d, default=str))  # a copy, with tuples as lists (as in JSON)
    for f in dataclasses.fields(cfg):
        if f.name in REPORT_ONLY:
            d[f.name] = f.default
    d["runtime"] = {k: v for k, v in d["runtime"].items() if k not in RESUMABLE_RUNTIME}
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("cache_dir", "scan_workers")}
    if not (as_typed or encoder_as_file or precision_as_typed):
        # bf16 typed on a GPU, fp32 on a CPU: what auto chooses there, so the same run.
        if d["runtime"].get("precision") == auto_precision(cfg.runtime.device):
            d["runtime"]["precision"] = "auto"
    if not as_typed:
        if d["data"].get("path") is not None:
            d["data"]["path"] = _place(d["data"]["path"])
        if d.get("encoder") is not None:  # a run directory and its encoder file are one
            place = Path(_place(d["encoder"]))
            if encoder_as_file:  # as earlier versions keyed a file named directly
                d["encoder"] = str(place / "encoder.safetensors" if place.is_dir() else place)
            else:
                d["encoder"] = str(place.parent if place.name == "encoder.safetensors"
                                   else place)
        if is_start_file(d.get("init")):
            d["init"] = _place(d["init"])
    return d


def changed_settings(recorded: dict, cfg) -> list[str]:
    """'name: old -> new' for each setting the resume key counts in which a run's recorded
    config (its config.json) differs from `cfg`: what a refused resume tells the user."""
    return [f"{k}: {old} -> {new}" for k, (old, new) in _differences(recorded, cfg).items()]


PLACES = ("data.path", "encoder", "init")  # settings that say where inputs are, not what


def only_moved(recorded: dict, cfg) -> bool:
    """Whether a run's recorded config differs from `cfg` only in where its inputs are (the
    data folder or a weights file moved, or mounted elsewhere): the inputs' own identity
    (data contents, weights) then decides whether the run may continue."""
    return _places_only(_differences(recorded, cfg))


def moved_away(recorded: dict, cfg) -> bool:
    """only_moved, and every input place the run recorded is gone: its inputs moved, rather
    than `cfg` naming other inputs (a second data folder) with the same settings."""
    diff = _differences(recorded, cfg)
    return _places_only(diff) and not any(Path(old).exists() for old, _ in diff.values())


def _places_only(diff: dict[str, tuple]) -> bool:
    """Whether differences are all in where inputs are, with a path on both sides: imagenet
    or random becoming a file (or the synthetic set a folder) is another start, not a move."""
    return bool(diff) and all(k in PLACES and all(map(is_start_file, pair))
                              for k, pair in diff.items())


def _differences(recorded: dict, cfg) -> dict[str, tuple]:
    """{setting: (recorded, now)} for the settings the resume key counts that differ."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    try:
        old, new = flat(_keyed(recorded, cfg)), flat(_keyed(to_dict(cfg), cfg))
    except (KeyError, TypeError, AttributeError):  # a config.json of another shape
        return {}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def recorded_config(record) -> dict | None:
    """The config a run's config.json holds, its relative paths made absolute from the folder
    it ran in (`cwd`; older files lack it and are read from here); None for another shape."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None
    config, cwd = record["config"], record.get("cwd")
    if not cwd:
        return config

    def place(p):
        return os.path.join(cwd, os.path.expanduser(p)) if is_start_file(p) else p
    data = config.get("data")
    return {**config, **({"data": {**data, "path": place(data.get("path"))}}
                         if isinstance(data, dict) else {}),
            **{k: place(config[k]) for k in ("encoder", "init") if k in config}}


def recorded_at(run: Path) -> dict | None:
    """recorded_config of the config.json in run directory `run`; None where it is missing,
    unreadable or of another shape."""
    try:
        return recorded_config(json.loads((Path(run) / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def resume_keys(cfg) -> tuple[str, ...]:
    """The keys a checkpoint of this config may carry: today's first, then earlier versions'
    (resume_key's flags), without repeats."""
    return tuple(dict.fromkeys((resume_key(cfg), resume_key(cfg, precision_as_typed=True),
                                resume_key(cfg, as_typed=True),
                                resume_key(cfg, encoder_as_file=True))))


def _place(path: str) -> str:
    return str(Path(path).expanduser().resolve())
