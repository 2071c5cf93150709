"""`sstl reproduce`: the paper's Table 2 and Fig. 3 as a grid of ordinary runs, collected.

Rows (Table 2): Ours = Cross pretrained from the transfer start; Transfer = fine-tuning from
the transfer start; Cross, BYOL, SimSiam, SimCLR, PIRL-Jigsaw and PIRL-Rotation pretrained
from random weights (config.ROWS); From Scratch = fine-tuning from random weights. Columns
(Fig. 3): label fractions. Each pretraining runs once per seed and serves every fraction.
Every cell is a run directory under <out>/<name>/, named by row, fraction and seed; a cell
whose outputs are complete is read, not rerun, and an interrupted cell resumes from its
checkpoint, so rerunning the command continues the grid.

Outputs in <out>/<name>/: table2.md and table2.csv (all labels: Sen, Spe, HM, AUC, Acc as
mean ± std over the last epochs (10 in the paper preset), then across seeds), fig3.png (HM
and Acc against the label fraction), fig3.csv (every row and fraction, as table2.csv),
results.json (every cell), and with --evaluate-on the same metrics of every fine-tuned
model on that other labelled set. A grid folder that holds runs of other settings or
images is refused, not mixed into the table.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from . import dist
from .config import (ROWS, AugmentConfig, DataConfig, EvaluateConfig, FinetuneAugment,
                     FinetuneConfig, PretrainConfig, ReproduceConfig, check,
                     imagenet_version, resolve)
from .classifier import check_start
from .data.dataset import load_dataset
from .data.index import DataError
from .finetune import check_split_classes, finetune
from .io import atomic_write, make_dir, save_json
from .keys import changed_settings, only_moved, recorded_at, recorded_config, resume_keys
from .evaluation import new_figure
from .metrics import METRICS
from .predict import evaluate
from .pretrain import pretrain
from .inputs import file_identity, inputs_parts, same_data, start_identity
from .runs import log

LABELS = {"ours": "Ours (Cross + Transfer)", "transfer": "Transfer", "cross": "Cross",
          "byol": "BYOL", "simsiam": "SimSiam", "simclr": "SimCLR", "pirl-jigsaw": "PIRL-Jigsaw",
          "pirl-rotation": "PIRL-Rotation", "scratch": "From Scratch"}


def _paper_preset() -> dict:
    """The paper's settings (a GPU job): the commands' own defaults, read, not copied."""
    pre, fine = PretrainConfig(), FinetuneConfig()
    return dict(arch=pre.arch, pretrain_epochs=pre.epochs, view_size=pre.augment.size,
                pretrain_batch=pre.batch_size, finetune_epochs=fine.epochs,
                image_size=fine.augment.size, finetune_batch=fine.batch_size,
                cache_size=fine.data.cache_size, summary_last=fine.summary_last)


# What the settings of each preset are.
PRESETS = {
    "paper": _paper_preset(),
    "quick": dict(arch="resnet18", pretrain_epochs=3, view_size=64, pretrain_batch=64,
                  finetune_epochs=5, image_size=64, finetune_batch=64, cache_size=64,
                  summary_last=3),
}

# The paper's claim is an ordering; its per-row values were not available offline. The
# journal version's abstract (Li et al., IJCARS 2023, arXiv:2212.09276) gives its method's
# scores: HM 0.985, AUC 0.999, four-class accuracy 0.953 (100% of the labels).
PAPER_REFERENCE = ("The paper's claim: Ours > Transfer > Cross > the other self-supervised "
                   "rows > From Scratch, at every label fraction. Its journal version reports "
                   "for Ours HM 0.985, AUC 0.999, Acc 0.953 (arXiv:2212.09276, abstract); the "
                   "other rows' published values are not reproduced here.")
# Said beside every table: the rows compare methods under one protocol, not at their best.
RECIPE_NOTE = ("Every row trains with the same recipe (the paper's: optimizer, epochs, batch, "
               "views and augmentation), not each method's published best (BYOL and SimCLR "
               "used LARS, large batches and cosine schedules).")


def available_rows(cfg: ReproduceConfig) -> list[tuple[str, str | None, str]]:
    """The rows --row names (check() has refused unknown ones), in the paper's order."""
    return [r for r in ROWS if not cfg.rows or r[0] in cfg.rows]


def _start(start: str, cfg: ReproduceConfig) -> tuple[str, str]:
    """(init, imagenet_weights) of a row's start: the newest torchvision weights the preset's
    arch has (V2 for resnet50, V1 for resnet18), also in its fine-tuning cells."""
    if start == "random" or cfg.transfer != "imagenet":
        return (cfg.transfer if start == "transfer" else "random"), "V2"
    return "imagenet", imagenet_version(PRESETS[cfg.preset]["arch"], "auto")


def _done(run: Path, weights: str, epochs: int) -> bool:
    meta = run / weights.replace(".safetensors", ".json")
    return meta.exists() and json.loads(meta.read_text()).get("epoch") == epochs


def _made_otherwise(run: Path, cfg, data: str) -> bool:
    """Whether `run` was made with other settings (resume key), other images than `cfg` on
    data identity `data` (Dataset.identity), or another --transfer file's bytes: Run.resume's
    refusals, gathered for the whole grid before anything runs (an encoder cell's encoder is
    checked when it is read, by _from_another_encoder). A cell without a checkpoint (deleted
    to save space: it is most of a grid's bytes) is judged by its config.json, which every
    cell writes before it trains. An unreadable checkpoint is the run's own business."""
    ck = _checkpoint(run)
    if ck is None:
        return _recorded_otherwise(run, cfg, data)
    if not isinstance(ck, dict):
        return True
    if ck.get("resume_key") not in resume_keys(cfg) and not _moved(run, cfg):
        return True
    return _other_inputs(ck.get("inputs"), cfg, data)


def _moved(run: Path, cfg) -> bool:
    """Whether the cell's config.json differs from `cfg` only in where its inputs are (the
    data or the transfer file moved): its inputs' contents then decide, as Run.resume does."""
    recorded = recorded_at(run)
    return recorded is not None and only_moved(recorded, cfg)


def _recorded_otherwise(run: Path, cfg, data: str) -> bool:
    """_made_otherwise from a cell's config.json: its settings, then its inputs."""
    try:
        record = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):  # no cell there yet (or nothing readable to judge by)
        return False
    recorded = recorded_config(record)
    if recorded is None:
        return False
    if changed_settings(recorded, cfg) and not only_moved(recorded, cfg):
        return True
    return _other_inputs(record.get("inputs"), cfg, data)


def _other_inputs(inputs, cfg, data: str) -> bool:
    if not isinstance(inputs, str):  # recorded before runs kept their inputs
        return False
    images, _, start = inputs_parts(inputs)
    init = cfg.init if getattr(cfg, "encoder", None) is None else None
    return not same_data(images, data) or (start is not None and start != start_identity(init))


def _checkpoint(run: Path):
    """A cell's checkpoint, mapped (a cheap look), or None where it has none that reads: an
    unreadable checkpoint is the run's own business (Run.resume falls back or says so)."""
    try:
        return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True,
                          mmap=True)
    except Exception:  # missing, or unreadable
        return None


def plan(cfg: ReproduceConfig, grid: Path, data: DataConfig, rows) -> list[dict]:
    """Every cell of the grid in the order it runs: its run directory and its checked config."""
    cells = []
    for seed in range(cfg.runtime.seed, cfg.runtime.seed + cfg.seeds):
        cells += [pretrain_cell(cfg, grid, data, row, method, start, seed)
                  for row, method, start in rows if method]  # once per row and seed
        cells += [finetune_cell(cfg, grid, data, row, method, start, seed, fraction)
                  for row, method, start in rows for fraction in cfg.fractions]
    return cells


def pretrain_cell(cfg: ReproduceConfig, grid: Path, data: DataConfig, row: str, method: str,
                  start: str, seed: int) -> dict:
    p, (init, weights) = PRESETS[cfg.preset], _start(start, cfg)
    rt = dataclasses.replace(cfg.runtime, out=str(grid), name=f"pretrain-{row}-s{seed}",
                             seed=seed)
    return {"kind": "pretrain", "row": row, "seed": seed, "run": grid / rt.name,
            "cfg": check(PretrainConfig(
                data=data, runtime=rt, method=method, arch=p["arch"], init=init,
                imagenet_weights=weights, epochs=p["pretrain_epochs"],
                batch_size=p["pretrain_batch"], augment=AugmentConfig(size=p["view_size"])))}


def finetune_cell(cfg: ReproduceConfig, grid: Path, data: DataConfig, row: str,
                  method: str | None, start: str, seed: int, fraction: float) -> dict:
    p, (init, weights) = PRESETS[cfg.preset], _start(start, cfg)
    name = f"finetune-{row}-f{fraction:g}-s{seed}"
    rt = dataclasses.replace(cfg.runtime, out=str(grid), name=name, seed=seed)
    encoder = str(grid / f"pretrain-{row}-s{seed}") if method else None
    return {"kind": "finetune", "row": row, "seed": seed, "fraction": fraction, "run": grid / name,
            "cfg": check(FinetuneConfig(
                data=data, runtime=rt, arch=p["arch"], encoder=encoder, init=init,
                imagenet_weights=weights, fraction=fraction, epochs=p["finetune_epochs"],
                batch_size=p["finetune_batch"], augment=FinetuneAugment(size=p["image_size"]),
                positive_class=cfg.positive_class, summary_last=p["summary_last"]))}


def reproduce(cfg: ReproduceConfig) -> Path:
    cfg = check(cfg)
    p = PRESETS[cfg.preset]
    # torchrun: one process group for the whole grid, which every cell's command joins. A
    # group left and joined again per cell failed at the second cell (the rendezvous store
    # of the first is gone), or hung.
    with dist.group(resolve(cfg.runtime, p["finetune_batch"])):  # every row fine-tunes
        return _grid(cfg, p)


def _grid(cfg: ReproduceConfig, p: dict) -> Path:
    grid = Path(cfg.runtime.out) / (cfg.runtime.name or f"reproduce-{cfg.preset}")
    rows = available_rows(cfg)
    data = dataclasses.replace(cfg.data, cache_size=p["cache_size"])
    for start in {start for _, _, start in rows}:  # missing weights fail before the scan
        check_start(p["arch"], *_start(start, cfg), flag="--transfer" if start == "transfer"
                    else "--init")
    # The scan every cell then maps; a split no cell could score fails before any training.
    with dist.main_first():  # rank 0 builds the cache, the others then map it
        ds = load_dataset(data, need_labels=True, log=log)
    check_split_classes(ds, cfg.positive_class)
    batch = p["pretrain_batch"]  # global: resolve() splits it across ranks
    if any(method for _, method, _ in rows) and len(ds.train_idx) < batch:  # no --batch-size
        raise SystemExit(f"--data {cfg.data.path}: {len(ds.train_idx)} training images are "
                         f"fewer than one pretraining batch of the {cfg.preset} preset "
                         f"({batch}); reproduce needs more images")
    if cfg.evaluate_on:  # read at the first cell's end: a bad set must fail before any training
        check_evaluate_on(cfg.evaluate_on, ds.class_names,
                          dataclasses.replace(data, path=cfg.evaluate_on))
    cells, identity = plan(cfg, grid, data, rows), ds.identity()
    other = [c["run"].name for c in cells if _made_otherwise(c["run"], c["cfg"], identity)]
    if other:
        raise SystemExit(f"{grid} holds runs made with other settings, images or --transfer "
                         f"file than this "
                         f"command's ({', '.join(other[:4])}{' ...' if len(other) > 4 else ''}; "
                         f"{len(other)} in all): reusing them would mix two experiments in one "
                         "table. Give --name for a new grid, or delete those runs to redo them")
    make_dir(grid)
    results = []
    for c in cells:
        if c["kind"] == "pretrain":
            if not _done(c["run"], "encoder.safetensors", p["pretrain_epochs"]):
                log(f"reproduce: pretraining {LABELS[c['row']]} (seed {c['seed']})")
                pretrain(c["cfg"])
        else:
            results.append(_run_finetune_cell(cfg, p, c))
        _release_memory()
    if not dist.is_main():
        return grid  # rank 0 writes
    results += earlier_cells(cfg, grid, data, identity, results)
    named = {c["row"] for c in results}
    table_cfg = dataclasses.replace(  # the tables: every finished cell of this grid's settings
        cfg, fractions=tuple(sorted({c["fraction"] for c in results})),
        rows=tuple(r for r, _, _ in ROWS if r in named))  # results.json says what it holds
    return collect(table_cfg, grid, [r for r in ROWS if r[0] in named], results)


CELL = re.compile(r"finetune-(?P<row>[a-z-]+)-f(?P<fraction>[0-9.e+-]+)-s(?P<seed>[0-9]+)")


def earlier_cells(cfg: ReproduceConfig, grid: Path, data: DataConfig, identity: str,
                  have: list[dict]) -> list[dict]:
    """The grid's finished fine-tuning cells that this command did not plan (other --row,
    --fraction or seeds, run by earlier commands), read so the tables hold every finished
    cell: a grid built row by row keeps its earlier rows. A cell made with other settings,
    images or encoder than this command would make it is left out of the tables, and said."""
    p, planned = PRESETS[cfg.preset], {c["run"] for c in have}
    rows = {row: (method, start) for row, method, start in ROWS}
    out = []
    for d in sorted(grid.glob("finetune-*")):
        m = CELL.fullmatch(d.name)
        if d.name in planned or m is None or m["row"] not in rows or \
                not (d / "summary.json").exists() or \
                not _done(d, "model.safetensors", p["finetune_epochs"]):
            continue
        try:
            cell = finetune_cell(cfg, grid, data, m["row"], *rows[m["row"]], int(m["seed"]),
                                 float(m["fraction"]))
        except (ValueError, SystemExit):  # not a name finetune_cell gives (f > 1, say)
            continue
        encoder = cell["cfg"].encoder and Path(cell["cfg"].encoder) / "encoder.safetensors"
        # Its pretraining too: an Ours cell's encoder was pretrained from the --transfer file
        # of the command that made it, which this command's may not be.
        pre = encoder and pretrain_cell(cfg, grid, data, m["row"], *rows[m["row"]],
                                        int(m["seed"]))
        if cell["run"] != d or _made_otherwise(d, cell["cfg"], identity) or (
                encoder and (_from_another_encoder(d, encoder)
                             or _made_otherwise(pre["run"], pre["cfg"], identity))):
            log(f"reproduce: {d.name} is not in the tables: it (or the pretraining it was "
                "fine-tuned from) was made with other settings, images, encoder or --transfer "
                "file than this command's")
            continue
        out.append(_run_finetune_cell(cfg, p, cell))
    return out


def _release_memory() -> None:
    """Between cells of one process: a finished run's model, optimizer and CUDA graph pool go
    back to the allocator now, not whenever a reference cycle is next collected (43 runs of
    the paper preset would otherwise stack up on the GPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_evaluate_on(path: str, classes: list[str], data: DataConfig) -> None:
    """--evaluate-on names labelled images whose classes the models know (evaluate's own
    refusals, made before the grid trains)."""
    try:
        other = load_dataset(data, need_labels=True, log=lambda m: None)
    except DataError as e:  # its messages name --data: here the set came from --evaluate-on
        msg = str(e)
        raise SystemExit(msg.replace("--data ", "--evaluate-on ", 1) if msg.startswith("--data ")
                         else f"--evaluate-on {path}: {msg}") from None
    unknown = sorted(set(other.class_names) - set(classes))
    if unknown:
        raise SystemExit(f"--evaluate-on {path}: class {unknown[0]!r} is not one of the "
                         f"training data's ({', '.join(map(repr, classes))})")


def _from_another_encoder(run: Path, encoder: Path) -> bool:
    """Whether a fine-tuning cell's checkpoint was trained from another encoder file than the
    one its pretraining cell holds now (the encoder's file_identity in inputs.run_inputs).
    An encoder file deleted since (to save space, after its fine-tunings) says nothing."""
    if not encoder.is_file():
        return False
    ck = _checkpoint(run)
    inputs = ck.get("inputs") if isinstance(ck, dict) else None
    made_from = inputs_parts(inputs)[1] if isinstance(inputs, str) else None
    return made_from is not None and made_from != file_identity(encoder)


def _run_finetune_cell(cfg: ReproduceConfig, p: dict, c: dict) -> dict:
    run, row, fraction, seed = c["run"], c["row"], c["fraction"], c["seed"]
    encoder = Path(c["cfg"].encoder) / "encoder.safetensors" if c["cfg"].encoder else None
    if encoder is not None and _from_another_encoder(run, encoder):
        raise SystemExit(f"{run} was fine-tuned from an earlier {encoder} (that pretraining was "
                         "redone since): its numbers would sit beside the new encoder's. Delete "
                         f"{run} to fine-tune it again")
    if not _done(run, "model.safetensors", p["finetune_epochs"]) or \
            not (run / "summary.json").exists():
        log(f"reproduce: fine-tuning {LABELS[row]}, {100 * fraction:g}% of the labels "
            f"(seed {seed})")
        finetune(c["cfg"])
    summary = json.loads((run / "summary.json").read_text())
    cell = {"row": row, "fraction": fraction, "seed": seed, "run": run.name,
            "start": summary["start"], **{k: summary["last_epochs"][k] for k in METRICS}}
    if cfg.evaluate_on and dist.is_main():  # only rank 0's cells make the tables
        m = evaluate(EvaluateConfig(model=str(run), data=DataConfig(
            path=cfg.evaluate_on, cache_size=p["cache_size"], cache_dir=c["cfg"].data.cache_dir),
            device=cfg.runtime.device))
        cell["evaluate_on"] = {k: m[k] for k in METRICS}
    return cell


def aggregate(cells: list[dict], rows, fractions) -> dict:
    """{row: {fraction: {metric: {"mean", "std", "seeds"}}}}: the last-epochs means, then the
    mean and std (population) across seeds; with one seed, the last-epochs std."""
    out = {}
    for row, _, _ in rows:
        out[row] = {}
        for f in fractions:
            got = [c for c in cells if c["row"] == row and c["fraction"] == f]
            if not got:
                continue
            stats = {}
            for k in METRICS:
                # null in summary.json is an undefined value (NaN): NumPy reads None as NaN.
                means = np.array([c[k]["mean"] for c in got], dtype=np.float64)
                std = float(means.std()) if len(got) > 1 else \
                    float(np.array(got[0][k]["std"], dtype=np.float64))
                stats[k] = {"mean": float(means.mean()), "std": std, "seeds": len(got)}
                if "evaluate_on" in got[0]:  # one number per model: no spread with one seed
                    other = np.array([c["evaluate_on"][k] for c in got], dtype=np.float64)
                    stats[f"other/{k}"] = {"mean": float(other.mean()), "seeds": len(got),
                                           "std": float(other.std()) if len(got) > 1 else None}
            out[row][f] = stats
    return out


def collect(cfg: ReproduceConfig, grid: Path, rows, cells: list[dict]) -> Path:
    table = aggregate(cells, rows, cfg.fractions)
    full = 1.0 if 1.0 in cfg.fractions else max(cfg.fractions)
    # Seeds per row and fraction: cells earlier commands ran may have other counts. The
    # heading counts Table 2's column; the note says what ± means in every table below it.
    count = {rf: len({c["seed"] for c in cells if (c["row"], c["fraction"]) == rf})
             for rf in {(c["row"], c["fraction"]) for c in cells}}
    counts, at_full = set(count.values()), {n for (_, f), n in count.items() if f == full}
    seeds = f"{min(at_full)}-{max(at_full)}" if len(at_full) > 1 else f"{max(at_full, default=0)}"
    keys = [*METRICS, *([f"other/{k}" for k in METRICS] if cfg.evaluate_on else [])]
    lines = [f"# Table 2 ({cfg.preset} preset, {100 * full:g}% of the labels, "
             f"{seeds} seed(s))", "", spread_note(cfg, counts) + f" Sen, Spe, HM and AUC: "
             f"{cfg.positive_class} against the other classes.", "",
             "| " + " | ".join(["method", *[k.replace("other/", "other ") for k in keys]]) + " |",
             "|---|" + "---:|" * len(keys)]
    for row, _, _ in rows:
        s = table[row].get(full)
        if s:
            lines.append(f"| {LABELS[row]} | " + " | ".join(_pm(s[k]) for k in keys) + " |")
    if absent := [LABELS[row] for row, _, _ in rows if full not in table[row]]:
        lines += ["", f"Not in this table (no {100 * full:g}% cell yet; in Fig. 3's table "
                      f"below): {', '.join(absent)}."]
    lines += fig3_table(table, rows, cfg.fractions, cfg.positive_class)
    transfer = any(start == "transfer" for _, _, start in rows)  # else no row used it
    lines += ["", RECIPE_NOTE, "", f"Reference: {PAPER_REFERENCE}", "",
              (f"Start of Ours/Transfer: {cfg.transfer}. " if transfer else "")
              + f"Data: {cfg.data.path or 'SYNTHETIC demo set'}."]
    text = "\n".join(lines) + "\n"
    atomic_write(grid / "table2.md", lambda tmp: tmp.write_text(text))

    fig3_rows = [_csv_row(row, f, table[row][f], keys)
                 for row, _, _ in rows for f in sorted(cfg.fractions) if f in table[row]]
    table2_rows = [r for r in fig3_rows if r["fraction"] == full]  # Table 2: its one column
    for name, body in (("table2.csv", table2_rows), ("fig3.csv", fig3_rows)):
        atomic_write(grid / name, lambda tmp, body=body: _write_csv(tmp, body, keys))
    # The data block as the cells ran it: the preset sets the cache size (no flag does).
    used = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, cache_size=PRESETS[cfg.preset]["cache_size"]))
    save_json({"config": dataclasses.asdict(used), "preset": PRESETS[cfg.preset],
               "table": {r: {str(f): v for f, v in fs.items()} for r, fs in table.items()},
               "cells": cells, "paper_reference": PAPER_REFERENCE}, grid / "results.json")
    fig3(grid / "fig3.png", table, rows, cfg.fractions, cfg.positive_class)
    log(text)
    return grid


def _csv_row(row: str, fraction: float, stats: dict, keys) -> dict:
    """One method at one label fraction: each metric's mean and std, and how many seeds."""
    return {"row": row, "fraction": fraction, "seeds": stats[keys[0]]["seeds"],
            **{f"{k}_{s}": stats[k][s] for k in keys for s in ("mean", "std")}}


def _write_csv(tmp: Path, body: list[dict], keys) -> None:
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["row", "fraction", "seeds", *(
            f"{k}_{s}" for k in keys for s in ("mean", "std"))])
        w.writeheader()
        w.writerows(body)


def _pm(stat: dict) -> str:
    """mean ± std, or the mean alone where there is no spread to give."""
    std = stat.get("std")
    return f"{stat['mean']:.3f}" + ("" if std is None or np.isnan(std) else f" ± {std:.3f}")


def spread_note(cfg: ReproduceConfig, counts: set[int] | None = None) -> str:
    """What a table's ± means, for the seed counts its rows have (`counts`; cfg.seeds's)."""
    last, counts = PRESETS[cfg.preset]["summary_last"], counts or {cfg.seeds}
    one = f"± is the std of those {last} epochs (population, one seed)."
    several = "± is the std of the seeds' values (population)."
    where = "the `seeds` column of table2.csv and fig3.csv"
    if counts == {1}:
        note = one
    elif len(counts) == 1:
        note = f"then averaged over {max(counts)} seeds; {several}"
    elif 1 not in counts:
        note = f"then averaged over its seeds ({where}); {several}"
    else:
        note = (f"where a row has several seeds ({where}), then averaged over them, and "
                f"{several[:-1]}; where it has one, {one}")
    note = f"Each value is a run's test score averaged over its last {last} fine-tuning " \
           f"epochs; {note}"
    if cfg.evaluate_on:
        note += (" The `other` columns score each run's final model on --evaluate-on" +
                 ("." if counts == {1} else " (± over seeds, where a row has several)."
                  if 1 in counts else " (± over seeds)."))
    return note


def _titles(positive: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The two metrics of Fig. 3 and their titles: HM of the positive class, accuracy."""
    return ("hm", f"HM ({positive} vs rest)"), ("acc", "Accuracy (all classes)")


def fig3_table(table: dict, rows, fractions, positive: str) -> list[str]:
    """Fig. 3's points as text: HM and Acc (mean ± std) per row and label fraction."""
    xs = sorted(fractions)
    lines = []
    for k, title in _titles(positive):
        lines += ["", f"Fig. 3, {title}, by label fraction:", "",
                  "| method | " + " | ".join(f"{100 * f:g}%" for f in xs) + " |",
                  "|---|" + "---:|" * len(xs)]
        for row, _, _ in rows:
            cells = [_pm(table[row][f][k]) if f in table[row] else "" for f in xs]
            lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return lines


def fig3(path: Path, table: dict, rows, fractions, positive: str) -> None:
    """HM and Acc against the label fraction, one line per row, as the paper's Fig. 3."""
    fig, axes = new_figure((10, 4), cols=2, dpi=120)
    xs = sorted(fractions)
    for ax, (k, title) in zip(axes, _titles(positive)):
        for row, _, _ in rows:
            pts = [(f, table[row][f][k]) for f in xs if f in table[row]]
            if pts:
                ax.errorbar([100 * f for f, _ in pts], [s["mean"] for _, s in pts],
                            yerr=[s["std"] for _, s in pts], marker="o", capsize=3,
                            label=LABELS[row])
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in xs], [f"{100 * f:g}%" for f in xs])
        ax.set_xlabel("labels used")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
