"""Supervised fine-tuning and the paper's evaluation protocol, on the shared loop.

Every epoch trains the whole network on the (--fraction of the) training split, then
evaluates the whole test split: one row of metrics.csv. At the end (also when a finished run
is rerun): model.safetensors from the final checkpoint's state, summary.json (Table 2's mean
and std over the last epochs, and the best epoch), the final model's confusion matrix and ROC,
and a table.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from . import dist
from .command import begin, check_two_classes, data_record, load_data, run_name
from .config import (IMAGENET_MEAN, IMAGENET_STD, FinetuneConfig, Resolved, check, resolve,
                     save_json)
from .data.backends import labelled_source
from .data.dataset import Dataset
from .data.index import DataError
from .data.split import fraction_subset
from .loop import Plan, Trainer, fit
from .evaluation import bootstrap_ci, card_fields, curves_png, draw_figures, write_model_card
from .metrics import METRICS, best_epoch, classification_metrics, display_name, summarize
from .models import (imagenet_tag, is_start_file, learned_images, saw_all_unlabelled, sidecar,
                     sstl_weights, weights_file)
from .inputs import run_inputs
from .record import save_weights, settings_hash
from .runs import Output, Run, log
from .classifier import check_start, classifier_trainer, eval_probs

FEW_IMAGES = 5  # a class with fewer training images than this gets a warning (noisy results)
CI_RESAMPLES = 1000  # bootstrap resamples of the test split for the model card's 95% intervals


def build_trainer(cfg: FinetuneConfig, res: Resolved, n_classes: int, encoder: Path | None,
                  total_steps: int) -> Trainer:
    return classifier_trainer(
        cfg.arch, str(encoder) if encoder else cfg.init, cfg.imagenet_weights, n_classes, res,
        lr=cfg.lr, schedule=cfg.schedule, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
        seed=cfg.runtime.seed, total_steps=total_steps,
        flag="--encoder" if encoder else "--init")


def encoder_file(cfg: FinetuneConfig) -> Path:
    """--encoder's weights file, after checking it exists, has its sidecar and fits --arch."""
    f = weights_file(cfg.encoder, "encoder.safetensors", flag="--encoder",
                     give="the encoder.safetensors of `sstl pretrain` or `sstl supervised`, or "
                     "its run directory (another tool's weights file goes to --init PATH)")
    meta = sidecar(f)
    if meta.get("arch") != cfg.arch:
        raise SystemExit(f"--encoder {f} holds a {meta.get('arch')} backbone but --arch is "
                         f"{cfg.arch}; pass --arch {meta.get('arch')}")
    return f


def start_file(cfg: FinetuneConfig) -> Path | None:
    """The sstl weights file the classifier starts from: --encoder's, or an --init PATH with
    a sidecar (a stage-1 or pretraining encoder given as --init). None for imagenet, random
    and weights sstl did not write (nothing records what they saw)."""
    return encoder_file(cfg) if cfg.encoder is not None else sstl_weights(cfg.init)


def check_encoder(cfg: FinetuneConfig, ds: Dataset) -> Path | None:
    """The start file (start_file), after checking that the weights never saw this run's test
    split: at any stage before (its sidecar's `trained_on` carries its own starts' images)."""
    f = start_file(cfg)
    if f is None:
        return None
    flag = "--encoder" if cfg.encoder is not None else "--init"
    meta = sidecar(f)
    other_data = meta.get("data_fingerprint") != ds.fingerprint()
    what = " (the embedded SYNTHETIC set)" if meta.get("synthetic_data") else ""
    if meta.get("stage") == "supervised":
        log(f"{flag} {f}: a stage-1 encoder (supervised on {meta.get('data_root')})")
    if meta.get("stage") == "supervised" and "trained_on" not in meta:
        pass  # written before stage 1 listed its images: natural images, as intended
    elif not saw_all_unlabelled(meta) and "trained_on" in meta:  # the exact check
        seen = int(ds.learned(meta["trained_on"], ds.test_idx).sum())
        if seen:
            raise SystemExit(f"{flag} {f} was pretrained on {seen} of this run's "
                             f"{len(ds.test_idx)} test images. {_leak_fix(meta, cfg, ds)}.")
        if other_data:
            log(f"{flag} {f} was pretrained on other images than --data{what}; none of "
                "this run's test images is among them (compared by content)")
    elif other_data:
        log(f"warning: {flag} {f} was pretrained on other images than --data{what}; "
            "whether it has seen this run's test images cannot be checked")
    elif meta.get("test_fingerprint") != ds.fingerprint(ds.test_idx):
        raise SystemExit(
            f"{flag} {f} was pretrained on this data with another train/test split "
            f"(--split-seed {meta.get('split_seed')} --test-fraction {meta.get('test_fraction')}; "
            f"this run: --split-seed {cfg.data.split_seed} --test-fraction "
            f"{cfg.data.test_fraction}): the encoder has seen images this split would test on. "
            f"Rerun with --split-seed {meta.get('split_seed')} --test-fraction "
            f"{meta.get('test_fraction')}.")
    elif saw_all_unlabelled(meta):
        log(f"warning: {flag} {f} was pretrained with --split all: it has seen the test "
            "images (without labels); the test split is not unseen")
    return f


def _leak_fix(meta: dict, cfg: FinetuneConfig, ds: Dataset) -> str:
    """What to do about a start that learned from this run's test images, by how it came to."""
    start = meta.get("init")
    inherited = is_start_file(start)
    split = (meta.get("split_seed"), meta.get("test_fraction"))
    same_split = split == (cfg.data.split_seed, cfg.data.test_fraction)
    if meta.get("data_fingerprint") != ds.fingerprint():
        return ("Its training data held these files (the same bytes) under another folder"
                + (f" (or the weights it started from, {start}, learned from them)"
                   if inherited else "")
                + ": train it on images that leave this run's test split out, e.g. pretrain "
                "on --data itself with the same --split-seed")
    if inherited and same_split and meta.get("test_fingerprint") == ds.fingerprint(ds.test_idx):
        return (f"The weights it started from ({start}) learned from them; start it from "
                "weights that did not, or fine-tune with their split")
    if not same_split:
        return (f"It was pretrained with another train/test split: rerun with --split-seed "
                f"{split[0]} --test-fraction {split[1]}")
    return ("The data changed since pretraining (an image added, removed or unreadable "
            "reshuffles its class's split): pretrain again on this data, or fine-tune on the "
            "data as it was")


def default_name(cfg: FinetuneConfig, start: str) -> str:
    """The same command names the same directory, so rerunning it resumes."""
    return run_name(cfg, f"finetune-{cfg.arch}-{Path(start).parent.name or start}-"
                         f"f{cfg.fraction:g}")


def finetune(cfg: FinetuneConfig) -> Path:
    cfg = check(cfg)
    res = resolve(cfg.runtime, cfg.batch_size)
    # Missing or unfitting weights fail now, not after a long first scan of the data.
    if cfg.encoder is not None:
        encoder_file(cfg)
    else:
        check_start(cfg.arch, cfg.init, cfg.imagenet_weights)
    with dist.group(res):  # torchrun: join the other processes for the run
        return _finetune(cfg, res)


def _finetune(cfg: FinetuneConfig, res: Resolved) -> Path:
    t_data = time.perf_counter()
    ds = load_data(cfg, need_labels=True)
    check_split_classes(ds, cfg.positive_class)
    origin = check_encoder(cfg, ds)  # refusals come before the run directory exists
    encoder = origin if cfg.encoder is not None else None
    start = str(encoder) if encoder else cfg.init
    with Run.open(cfg.runtime.out, cfg.runtime.name or default_name(cfg, start),
                  res.is_main) as run:
        run.add_time("data", time.perf_counter() - t_data)  # scan and cache
        inputs = run_inputs(ds.identity(), encoder, None if encoder else cfg.init)
        begin(run, cfg, ds, inputs)
        t_build = time.perf_counter()
        subset = choose_subset(cfg, ds, run.path, res.is_main)
        train = labelled_source(np.asarray(ds.images[subset]), ds.targets[subset], cfg, res, True)
        # The test split is evaluated whole, by rank 0 alone.
        test = labelled_source(np.asarray(ds.images[ds.test_idx]), ds.targets[ds.test_idx], cfg,
                               dataclasses.replace(res, rank=0, world_size=1), False)
        t = build_trainer(cfg, res, len(ds.class_names), encoder,
                          cfg.epochs * train.steps_per_epoch)
        run.add_time("build", time.perf_counter() - t_build)
        run.write_config(cfg, res, {"start": start, "n_train": len(subset),
                                    "n_test": len(test.images),
                                    "steps_per_epoch": train.steps_per_epoch,
                                    "class_names": ds.class_names,
                                    "data": data_record(ds), "inputs": inputs})
        y_test = ds.targets[ds.test_idx]
        scored = {}  # epoch -> test probabilities of the latest evaluation (the figures reuse it)

        def evaluate(epoch: int) -> dict:
            if not res.is_main:  # the others wait while rank 0 evaluates (its row is the one)
                dist.barrier()
                return {}
            t0 = time.perf_counter()
            probs = eval_probs(t, test)
            scored.clear()
            scored[epoch] = probs
            row = classification_metrics(y_test, probs.argmax(1), probs, ds.class_names,
                                         cfg.positive_class)
            log(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {row[k]:.4f}"
                                                               for k in METRICS))
            dist.barrier()
            run.add_time("evaluate", time.perf_counter() - t0)
            return {**row, "eval_seconds": time.perf_counter() - t0}

        rows = fit(run, t, train, Plan.of(cfg, desc=f"finetune {cfg.arch}",
                                          on_epoch_end=evaluate, live=res.is_main,
                                          inputs=inputs))
        if res.is_main:
            t_report = time.perf_counter()
            save_model(run.path, cfg, t.model, ds, cfg.epochs, start, subset, origin)
            # The final epoch's scores, unless this process did not train it (a rerun of a
            # finished run): then the final weights are scored once more.
            final = scored.get(cfg.epochs - 1)
            finish(run.path, cfg, ds, rows, final if final is not None else eval_probs(t, test),
                   start, subset)
            run.add_time("report", time.perf_counter() - t_report)  # weights, figures, card
        dist.barrier()  # under torchrun every rank returns once the outputs exist (reproduce)
        return run.path


def check_positive(class_names: list[str], positive: str) -> int:
    if positive not in class_names:
        raise DataError(f"--positive-class {positive!r} is not a class of this data; its classes "
                        f"are: {', '.join(repr(c) for c in class_names)}")
    return class_names.index(positive)


def check_split_classes(ds: Dataset, positive: str) -> None:
    """Refuse, before anything trains, a split whose metrics cannot mean anything: a class with
    no training image (the classifier never sees it), or a test split without the positive
    class or without any other (Sen, HM and AUC, or Spe, would be undefined every epoch)."""
    pos = check_positive(ds.class_names, positive)
    check_two_classes(ds)
    fix = ("change --test-fraction or --split-seed, or fix each image's side with a manifest "
           "`split` column")
    train = np.bincount(ds.targets[ds.train_idx], minlength=len(ds.class_names))
    if (train == 0).any():
        empty = [ds.class_names[c] for c in np.flatnonzero(train == 0)]
        raise DataError(f"the training split has no image of {', '.join(map(repr, empty))} (all "
                        f"of them are in the test split); {fix}")
    test = np.bincount(ds.targets[ds.test_idx], minlength=len(ds.class_names))
    if test[pos] == 0 or test.sum() == test[pos]:
        missing = repr(positive) if test[pos] == 0 else f"any class other than {positive!r}"
        raise DataError(f"the test split ({int(test.sum())} images) has no image of {missing}: "
                        f"sensitivity, specificity, HM and AUC of {positive!r} against the rest "
                        f"would be undefined; {fix}")
    if (test == 0).any():  # the headline metrics stand; that class's recall cannot
        absent = ", ".join(repr(ds.class_names[c]) for c in np.flatnonzero(test == 0))
        log(f"warning: the test split has no image of {absent}: its recall will be NaN and "
            f"accuracy measures the other classes only; {fix}")


def choose_subset(cfg: FinetuneConfig, ds: Dataset, run: Path, write: bool = True) -> np.ndarray:
    """The --fraction subset of the training split (nested, stratified), saved as subset.json."""
    idx = fraction_subset(ds.train_idx, ds.labels, ds.groups, cfg.fraction, cfg.runtime.seed)
    counts = Counter(ds.labels[i] for i in idx)
    few = {c: n for c, n in sorted(counts.items()) if n < FEW_IMAGES}
    if few:
        listed = ", ".join(f"{c!r}: {n}" for c, n in few.items())
        log(f"warning: --fraction {cfg.fraction} leaves few training images in "
                          f"{listed}; expect noisy metrics")
    if write:
        save_json({"fraction": cfg.fraction, "seed": cfg.runtime.seed, "n": len(idx),
                   "per_class": counts, "fingerprint": ds.fingerprint(idx),
                   "train": [ds.records[i].rel for i in idx]}, run / "subset.json")
    return idx


def save_model(run: Path, cfg: FinetuneConfig, model, ds: Dataset, epoch: int,
               start: str, subset=None, encoder: Path | None = None) -> None:
    """model.safetensors + model.json: everything `sstl predict` / `evaluate` need to use it.

    `trained_on` lists the images the weights learned from: the labelled subset, and the
    images its encoder was pretrained on (unless that was --split all, which finetune warned
    about), so `sstl evaluate` leaves exactly those out."""
    learned = set(ds.image_ids(subset)) if subset is not None else set()
    enc = sidecar(encoder) if encoder is not None else {}  # the start file (start_file)
    learned |= learned_images(enc)  # its images, and its starts'
    save_weights(model.state_dict(), run / "model.safetensors", {
        "kind": "sstl-classifier", "arch": cfg.arch, "class_names": ds.class_names,
        "positive_class": cfg.positive_class, "image_size": cfg.augment.size,
        "cache_size": cfg.data.cache_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "input": "grayscale replicated to 3 channels, resized square, ImageNet-normalised",
        "epoch": epoch, "start": start, "fraction": cfg.fraction,
        "settings_hash": settings_hash(cfg),
        "split_seed": cfg.data.split_seed, "test_fraction": cfg.data.test_fraction,
        "data_fingerprint": ds.fingerprint(), "test_fingerprint": ds.fingerprint(ds.test_idx),
        "synthetic_data": ds.synthetic, "trained_on": sorted(learned),
        "imagenet_weights": imagenet_tag(start, cfg.imagenet_weights),
        # evaluate's warning: the encoder's images are not in trained_on (learned_images)
        **({"pretrain_split": "all"} if saw_all_unlabelled(enc) else {})})


def finish(run: Path, cfg: FinetuneConfig, ds: Dataset, rows: list[dict], probs,
           start: str, subset: np.ndarray) -> dict:
    """summary.json, the final model's figures and card, and the table: what a reader sees first."""
    subset_counts = Counter(ds.labels[i] for i in subset)
    keys = [*METRICS, *(f"recall/{c}" for c in ds.class_names)]
    b, by = best_epoch(rows)
    tail = rows[-cfg.summary_last:]
    summary = {
        "last_epochs": summarize(rows, keys, cfg.summary_last),
        "last_epochs_used": [int(r["epoch"]) for r in tail],
        "std": "population std (ddof=0) over last_epochs_used",
        "epoch_numbering": "from 0, as in metrics.csv",
        "best": {"epoch": int(rows[b]["epoch"]), "by": by, **{k: float(rows[b][k]) for k in keys}},
        "best_note": "the best epoch is chosen on the test split, so it is optimistic; "
                     "Table 2's form is the mean over the last epochs",
        "epochs_done": len(rows), "positive_class": cfg.positive_class,
        "class_names": ds.class_names, "n_train": len(subset), "n_test": int(len(ds.test_idx)),
        "fraction": cfg.fraction, "start": start, "arch": cfg.arch,
        # What --fraction took (whole groups, at least one per class): ceil makes 1% of a
        # small set more than 1%, and the card says so beside the request.
        "fraction_taken": round(len(subset) / max(len(ds.train_idx), 1), 4),
        "n_train_split": int(len(ds.train_idx)),
        "image_size": cfg.augment.size, "synthetic_data": ds.synthetic}
    save_json(summary, run / "summary.json")
    # The figures and the card describe the saved model: the final epoch's.
    y_test = ds.targets[ds.test_idx]
    draw_figures(run, y_test, probs, ds.class_names, cfg.positive_class, f"final epoch {len(rows)}")
    curves_png(rows, run / "curves.png")
    write_card(run, cfg, ds, rows, summary, probs, subset_counts)
    Output().print(summary_table(summary, f"{cfg.arch} from {Path(start).name}, "
                                           f"fraction {cfg.fraction}: {run}"))
    return summary


def summary_table(summary: dict, title: str) -> Table:
    last, best = summary["last_epochs"], summary["best"]
    n = len(summary["last_epochs_used"])
    t = Table(title=escape(title))  # a path, not markup
    t.add_column("metric")
    t.add_column(f"mean ± std, last {n} epoch{'s' * (n > 1)}", justify="right")
    # Counted as the progress lines count; summary.json and metrics.csv count from 0.
    t.add_column(f"best epoch ({best['epoch'] + 1}; {best['epoch']} in metrics.csv), by "
                 f"{best['by'].upper()}", justify="right")
    for k in last:
        name = display_name(k)
        t.add_row(escape(name), f"{last[k]['mean']:.4f} ± {last[k]['std']:.4f}", f"{best[k]:.4f}")
    return t


def write_card(run: Path, cfg: FinetuneConfig, ds: Dataset, rows: list[dict], summary: dict,
               probs: np.ndarray, train_counts: Counter) -> None:
    """MODEL_CARD.md, and the same facts in model.json, with the final epoch's 95% intervals."""
    y_test = ds.targets[ds.test_idx]
    test_counts = Counter(ds.labels[i] for i in ds.test_idx)
    groups = [ds.records[i].group for i in ds.test_idx]  # patients, copies: resampled whole
    groups = groups if len(set(groups)) < len(groups) else None
    final = classification_metrics(y_test, probs.argmax(1), probs, ds.class_names,
                                   cfg.positive_class)
    start = summary["start"]
    tag = imagenet_tag(start, cfg.imagenet_weights)
    info = {"arch": cfg.arch, "start": f"{start} ({tag})" if tag else start,
            "fraction": cfg.fraction, "n_train": summary["n_train"],
            "n_train_split": summary["n_train_split"],
            "epochs": len(rows), "image_size": cfg.augment.size, "class_names": ds.class_names,
            "positive_class": cfg.positive_class, "data": str(ds.root),
            "synthetic_data": ds.synthetic, "last_epochs": summary["last_epochs"],
            "last_n": len(summary["last_epochs_used"]), "final": final,
            "final_epoch": len(rows) - 1, "run": run.name, "ci_n": CI_RESAMPLES,
            "final_ci": bootstrap_ci(y_test, probs, ds.class_names, cfg.positive_class,
                                     n=CI_RESAMPLES, seed=cfg.runtime.seed, groups=groups),
            "ci_unit": "groups (patients or near-duplicate images)" if groups is not None
                       else "images",
            "counts": {c: {"train": train_counts.get(c, 0), "test": test_counts.get(c, 0)}
                       for c in ds.class_names}}
    write_model_card(run, info)
    meta = sidecar(run / "model.safetensors")
    save_json({**meta, "model_card": card_fields(info)}, run / "model.json")
