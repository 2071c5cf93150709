"""Using a fine-tuned model: `predict` (class probabilities per image) and `evaluate` (metrics).

Both read the run directory's model.safetensors and its sidecar (classes, image size,
arch, positive class) and prepare images exactly as training evaluated them: decode to
grey (load_gray), resize to the cache size (resize_square), then the evaluation view.
"""
from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .config import (DataConfig, EvaluateConfig, PredictConfig, check, inference_runtime,
                     resolve, save_json)
from .data.dataset import load_dataset
from .data.index import DataError, decode_square, images_under
from .data.loader import LabelledSource
from .data.views import eval_view
from .evaluation import draw_figures
from .io import atomic_write, make_dir
from .classifier import class_probs
from .metrics import METRICS, classification_metrics, decide, decision_rule, display_name
from .models import load_classifier, saw_all_unlabelled, weights_file, without_image_list
from .runs import Output, log

SHOWN_ROWS = 50  # the printed table stops here; the CSV has every row
LEFT_OUT = "left out: "  # the error of a file a folder holds but predict does not read


def image_files(inputs) -> list[tuple[str, str | None]]:
    """(path, error) for every input: files as given, folders expanded to their images, sorted,
    by the rules of a training scan. What a folder holds but is not predicted (hidden files,
    mask folders, linked folders) gets a row saying so: no image is dropped unsaid."""
    out = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            left_out: list[dict] = []
            found = images_under(p, p, left_out)
            out += [(str(f), None) for f in found]
            out += [(str(p / e["path"]), _left_out(e)) for e in left_out]
            if not found and not left_out:
                out.append((str(p), "folder holds no image files"))
        elif p.suffix.lower() == ".csv" and p.is_file():  # a manifest: evaluate's input
            out.append((str(p), "a CSV file, not an image: predict takes images and folders; "
                                "to score a labelled manifest use sstl evaluate --data"))
        else:
            out.append((str(p), None if p.exists() else "no such file or folder"))
    return out


def _left_out(entry: dict) -> str:
    """A scan's left-out entry as a row's error: a folder says how many images it holds."""
    n = entry.get("files")
    return LEFT_OUT + entry["reason"] + (
        "" if n is None else f" ({n} image file{'s' * (n != 1)}; name it to predict them)")


def predict(cfg: PredictConfig) -> list[dict]:
    res = resolve(inference_runtime(check(cfg)), cfg.batch_size)
    if cfg.cam:
        from .explain import grad_cam_classes

        grad_cam_classes()  # a missing package fails now, not after the first batch
    model, meta = load_classifier(cfg.model, res.device, res.channels_last)
    warn_synthetic(meta, cfg.model)
    names, autocast = meta["class_names"], res.autocast
    pos = names.index(meta["positive_class"])
    rows, cam_failed = [], []
    files = image_files(cfg.inputs)
    for b in range(0, len(files), cfg.batch_size):
        chunk = [(p, *((None, err) if err else decode_square(p, meta["cache_size"])))
                 for p, err in files[b:b + cfg.batch_size]]
        good = [img for _, img, _ in chunk if img is not None]
        if good:
            x = torch.from_numpy(np.stack(good)).to(res.device)
            x = eval_view(x, meta["image_size"], getattr(torch, res.dtype), res.channels_last)
            probs = class_probs(model, [x], autocast).cpu().numpy()
            said = decide(probs, pos, cfg.threshold)
            cams = [""] * len(good)
            if cfg.cam:
                try:
                    cams = cam_overlays(model, meta, chunk, b, said, cfg.cam, res.device)
                except Exception as e:  # the overlays are extra: never lose the predictions
                    cam_failed.append((len(good), f"{type(e).__name__}: {e}"))
            probs, said, cams = iter(probs), iter(said), iter(cams)
        for path, img, err in chunk:
            rows.append(_row(path, names, *((None, None) if img is None else
                                            (next(probs), next(said))), err))
            if cfg.cam:  # which overlay shows this image ("" where there is none)
                rows[-1]["cam"] = "" if img is None else str(next(cams))
    write_predictions(rows, names, Path(cfg.out_csv), "--out-csv")
    Output().print(predictions_table(rows, names, cfg.out_csv))
    Output().print(f"prediction: {decision_rule(meta['positive_class'], cfg.threshold)}",
                   markup=False)
    if cfg.cam:
        Output().print(f"Grad-CAM overlays of the predicted class in {cfg.cam}", markup=False)
    if cam_failed:
        raise SystemExit(f"Grad-CAM failed for {sum(n for n, _ in cam_failed)} images (first: "
                         f"{cam_failed[0][1]}); every prediction is in {cfg.out_csv}")
    if rows and all(r["error"] for r in rows):  # scripts must see that nothing was predicted
        raise SystemExit(f"no input could be read ({len(rows)} tried; first: {rows[0]['path']}: "
                         f"{rows[0]['error']}); the reasons are in {cfg.out_csv}")
    return rows


def cam_overlays(model, meta: dict, chunk, start: int, predicted, out_dir, device) -> list[Path]:
    """Grad-CAM of the predicted class for the decoded images of one chunk; their paths.

    Files are <input number>-<file stem>-<class>.png: numbered, since stems repeat across folders.
    """
    from .explain import gradcam_overlays

    good = [(start + i, path, img) for i, (path, img, _) in enumerate(chunk) if img is not None]
    names = [_file_name(f"{i:05d}-{Path(path).stem}-{meta['class_names'][k]}")
             for (i, path, _), k in zip(good, predicted)]
    return gradcam_overlays(model, np.stack([img for _, _, img in good]), meta["image_size"],
                            [int(k) for k in predicted], out_dir, names, device)


def _file_name(text: str) -> str:
    """A class or file name made safe as one file name: "Pneumonia/bacterial" would name a
    folder that does not exist."""
    return re.sub(r"[^\w.+=-]", "_", text)


def _row(path: str, names: list[str], p: np.ndarray | None, k: int | None,
         error: str | None) -> dict:
    """One CSV row: `k` is the predicted class (metrics.decide), `confidence` its probability."""
    if p is None:
        return {"path": path, "prediction": "", "confidence": "", **{n: "" for n in names},
                "error": error}
    k = int(k)
    return {"path": path, "prediction": names[k], "confidence": float(p[k]),
            **{n: float(v) for n, v in zip(names, p)}, "error": ""}


def write_predictions(rows: list[dict], names: list[str], path: Path,
                      flag: str = "--out") -> None:
    """CSV: path, [label,] prediction, confidence, one probability column per class, error
    [, cam: the Grad-CAM overlay's file]. `flag`: the option naming the place."""
    make_dir(path.parent, flag)
    fields = list(rows[0]) if rows else ["path", "prediction", "confidence", *names, "error"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            # 9 significant digits: every float32 probability exactly. Six decimals tied small
            # scores (0.000000), and the AUC recomputed from the file moved (0.7969 vs 0.7959).
            w.writerows({k: f"{v:.9g}" if isinstance(v, float) else v for k, v in r.items()}
                        for r in rows)

    atomic_write(path, write, flag)


def predictions_table(rows: list[dict], names: list[str], csv_path) -> Table:
    bad = sum(1 for r in rows if r["error"])
    skipped = sum(1 for r in rows if r["error"].startswith(LEFT_OUT))
    t = Table(title=escape(f"{len(rows) - bad} predicted, {bad - skipped} unreadable"
                           + (f", {skipped} left out" if skipped else "")
                           + f"; all rows in {csv_path}"), expand=True)
    t.add_column("image", overflow="fold", ratio=3)
    t.add_column("prediction", overflow="fold", ratio=2)
    for name in names:
        t.add_column(escape(name), justify="right", ratio=1)
    for r in rows[:SHOWN_ROWS]:  # file names are text, never rich markup: `x [pa].png`
        if r["error"].startswith(LEFT_OUT):
            t.add_row(Text(r["path"]), Text(r["error"], style="yellow"), *[""] * len(names))
        elif r["error"]:
            t.add_row(Text(r["path"]), Text(f"error: {r['error']}", style="red"),
                      *[""] * len(names))
        else:
            t.add_row(Text(r["path"]), Text(r["prediction"]), *(f"{r[n]:.3f}" for n in names))
    if len(rows) > SHOWN_ROWS:
        t.add_row(f"... {len(rows) - SHOWN_ROWS} more rows in the CSV", "", *[""] * len(names))
    return t


def model_targets(data_names: list[str], model_names: list[str], targets: np.ndarray) -> np.ndarray:
    """The data's labels as the model's class indices, matched by name (not by position)."""
    unknown = [c for c in data_names if c not in model_names]
    if unknown:
        raise DataError(f"the data has classes the model does not know: "
                        f"{', '.join(map(repr, unknown))}; the model's classes are "
                        f"{', '.join(map(repr, model_names))}")
    return np.array([model_names.index(c) for c in data_names], dtype=np.int64)[targets]


def evaluate(cfg: EvaluateConfig) -> dict:
    res = resolve(inference_runtime(check(cfg)), cfg.batch_size)
    model, meta = load_classifier(cfg.model, res.device, res.channels_last)
    warn_synthetic(meta, cfg.model)
    trained_size = meta["cache_size"]  # decode as training did: another size shifts scores
    if cfg.data.cache_size is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_size=trained_size))
    elif cfg.data.cache_size != trained_size:
        log(f"warning: --cache-size {cfg.data.cache_size}, but the model was trained on images "
            f"decoded to {trained_size}; its scores shift (omit --cache-size to match)")
    ds = load_dataset(cfg.data, need_labels=True, log=log)
    names = meta["class_names"]
    targets = model_targets(ds.class_names, names, ds.targets)
    idx = np.arange(len(ds.records)) if cfg.split == "all" else test_split(ds, meta, cfg.data)
    idx, learned = unseen(ds, idx, meta, cfg.split)
    source = LabelledSource(np.asarray(ds.images[idx]), targets[idx], cfg.batch_size,
                            meta["image_size"], res.device, dtype=getattr(torch, res.dtype),
                            channels_last=res.channels_last)
    probs = class_probs(model, (x for x, _ in source.epoch(0)), res.autocast).cpu().numpy()
    pos = meta["positive_class"]
    said = decide(probs, names.index(pos), cfg.threshold)
    m = classification_metrics(targets[idx], said, probs, names, pos)
    what = evaluation_title(cfg.model, cfg.data.path or ds.root, cfg.split, len(idx),
                            ds.synthetic)
    Output().print(metrics_table(m, what))
    Output().print(f"prediction: {decision_rule(pos, cfg.threshold)}", markup=False)
    if cfg.out:
        write_evaluation(Path(cfg.out), m, ds, idx, targets, probs, said, meta, learned,
                         what, cfg.threshold)
    return m


def evaluation_title(model, data, split: str, n: int, synthetic: bool = False) -> str:
    """What an evaluation shows, for its table and its figures' titles: the model's run, the
    data and the images ("model ft-r18 on cxr-small, test split: 120 images"). A figure pasted
    into a report carries nothing else to say which model and data it is about."""
    run = weights_file(model, "model.safetensors").parent.resolve().name
    d = Path(data).expanduser().resolve()
    name = d.name if d.is_dir() else f"{d.parent.name}/{d.name}"  # a manifest: its folder too
    name = "the SYNTHETIC demo set" if synthetic else name
    which = "test split" if split == "test" else "all images"
    return f"model {run} on {name}, {which}: {n} images"


def warn_synthetic(meta: dict, model) -> None:
    """A model trained on the embedded demo set has the real classes' names but has never seen
    an X-ray: its outputs mean nothing, which nothing else in a prediction would show."""
    if meta.get("synthetic_data"):
        log(f"warning: {model} was trained on the SYNTHETIC demo set (no --data), not on "
            "X-rays: its predictions are not diagnoses")


def unseen(ds, idx: np.ndarray, meta: dict, split: str = "test") -> tuple[np.ndarray, int]:
    """The images of `idx` the model never learned from (its sidecar's `trained_on`: the
    fine-tuning subset and its encoder's pretraining images), and how many were left out.
    Scores of images a model trained on are optimistic, so they are never mixed in."""
    if saw_all_unlabelled(meta):  # its encoder's images are not listed (finetune warned too)
        log("warning: this model's encoder was pretrained with --split all: it has seen every "
            "image of its pretraining data (without labels), and those are not left out here")
    if not meta.get("trained_on"):  # a model saved before sidecars listed them
        return idx, 0
    keep = ~ds.learned(meta["trained_on"], idx)
    if not keep.any():
        raise SystemExit(f"all {len(idx)} images to evaluate were used to train this model; "
                         "evaluate it on images it has not seen ("
                         + ("--split test, or other data)" if split == "all" else "other data)"))
    if not keep.all():
        log(f"left out {int((~keep).sum())} of {len(idx)} images that this model learned from "
            "(fine-tuning, or its encoder's pretraining); scoring the other "
            f"{int(keep.sum())}")
    return idx[keep], int((~keep).sum())


def test_split(ds, meta: dict, data: DataConfig) -> np.ndarray:
    """The test split of `data`; for the model's own data, it must be the one training held out."""
    if meta.get("data_fingerprint") == ds.fingerprint() and \
            meta.get("test_fingerprint") != ds.fingerprint(ds.test_idx):
        given = (data.split_seed, data.test_fraction)
        fix = (f"pass --split-seed {meta.get('split_seed')} --test-fraction "
               f"{meta.get('test_fraction')}"
               if given != (meta.get("split_seed"), meta.get("test_fraction")) else
               # The same flags: the images are the same (by path), their split is not.
               "with training's own flags the split still differs: a manifest's `split` or "
               "`group` column (one side read a manifest, the other the folder), or labels "
               "changed since; give --data as training read it")
        raise SystemExit(f"this is the model's training data, but --split-seed {data.split_seed} "
                         f"--test-fraction {data.test_fraction} gives another test split than "
                         f"training held out; {fix}")
    if len(ds.test_idx) == 0:  # a few images: the stratified split held none of them out
        raise SystemExit(f"--split test: the test split of these {len(ds.records)} images is "
                         f"empty (--test-fraction {data.test_fraction}); evaluate with --split "
                         "all, or on more images")
    return ds.test_idx


def write_evaluation(out: Path, m: dict, ds, idx, targets, probs, said, meta, learned: int,
                     what: str, threshold: float | None = None) -> None:
    """metrics.json, data_report.json, predictions.csv and the figures (titled `what`:
    evaluation_title) into `out`."""
    make_dir(out)
    # Files that could not be scored are counted here and listed, with why, in data_report.json.
    rep = ds.report
    names, positive = meta["class_names"], meta["positive_class"]
    save_json({"metrics": m, "n": len(idx), "data": str(ds.root),
               "threshold": threshold, "decision": decision_rule(positive, threshold),
               "model": without_image_list(meta),
               "found": rep["found"], "unreadable": rep["unreadable"],
               "left_out": rep["left_out"], "left_out_trained_on": learned}, out / "metrics.json")
    save_json(rep, out / "data_report.json")
    rows = []
    for i, p, k in zip(idx, probs, said):
        r = _row(ds.records[i].rel, names, p, k, None)
        rows.append({"path": r.pop("path"), "label": names[targets[i]], **r})
    write_predictions(rows, names, out / "predictions.csv")
    draw_figures(out, targets[idx], probs, names, positive, what, said, threshold)


def metrics_table(m: dict, title: str) -> Table:
    t = Table(title=escape(title))
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in (*METRICS, *(k for k in m if k.startswith("recall/"))):
        t.add_row(escape(display_name(k)), f"{m[k]:.4f}")
    return t
