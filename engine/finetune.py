"""Supervised fine-tuning and the paper's evaluation protocol: the step, then the loop.

Every epoch trains the whole network on the (--fraction of the) training split, then
evaluates the whole test split: one row of metrics.csv, and checkpoint.pt and
model.safetensors rewritten, so a killed run resumes at the epoch boundary. At the end:
summary.json (Table 2's mean and std over the last epochs, and the best epoch), the
confusion matrix and ROC of the best epoch, and a table.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from .config import (IMAGENET_MEAN, IMAGENET_STD, FinetuneConfig, Resolved, config_hash, resolve,
                     save_json, to_dict)
from .data.dataset import Dataset, load_dataset, save_data_files
from .data.index import DataError
from .data.backends import labelled_source
from .data.split import fraction_subset
from .metrics import (METRICS, NAMES, auc_score, best_epoch, classification_metrics, confusion,
                      roc_points, summarize)
from .models import ARCHS, Classifier, backbone, sidecar, weights_file
from .plots import confusion_png, roc_png
from .runs import MetricsCSV, Reporter, atomic_save, make_run_dir, save_weights, write_config

FEW_IMAGES = 5  # a class with fewer training images than this gets a warning (noisy results)


@dataclass
class Step:
    """What one training step needs besides the batch (built once per run)."""

    model: Classifier
    forward: callable  # the model, compiled or not
    opt: torch.optim.Optimizer
    label_smoothing: float
    autocast: callable  # () -> context manager


def train_step(s: Step, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on one batch, backward, SGD step. No host sync."""
    with s.autocast():
        loss = F.cross_entropy(s.forward(x), y, label_smoothing=s.label_smoothing)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    return loss.detach()


def lr_at(cfg: FinetuneConfig, step: int, total: int) -> float:
    """The learning rate of a global step: a function of the step alone (nothing to resume)."""
    if cfg.schedule == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))


@torch.no_grad()
def class_probs(forward, batches, autocast) -> torch.Tensor:
    """Softmax probabilities (fp32, on the device) of a stream of model inputs, in order."""
    return torch.cat([_softmax(forward, x, autocast) for x in batches])


def _softmax(forward, x, autocast) -> torch.Tensor:
    with autocast():
        return forward(x).float().softmax(1)


def check(cfg: FinetuneConfig) -> None:
    """Refuse settings that cannot mean anything, before any work is done."""
    if not 0 < cfg.fraction <= 1:
        raise SystemExit(f"--fraction must be in (0, 1], not {cfg.fraction}")
    if cfg.schedule not in ("cosine", "constant"):
        raise SystemExit(f"--schedule must be cosine or constant, not {cfg.schedule!r}")
    if cfg.augment.size < 32:
        raise SystemExit(f"--image-size {cfg.augment.size} is too small for a ResNet (min 32)")
    if cfg.epochs < 1 or cfg.summary_last < 1:
        raise SystemExit("--epochs and --summary-last must be at least 1")


def check_positive(class_names: list[str], positive: str) -> int:
    if positive not in class_names:
        raise DataError(f"--positive-class {positive!r} is not a class of this data; its classes "
                        f"are: {', '.join(repr(c) for c in class_names)}")
    return class_names.index(positive)


def check_encoder(cfg: FinetuneConfig, ds: Dataset) -> Path | None:
    """The encoder file, after checking that its pretraining never saw this run's test split."""
    if cfg.encoder is None:
        return None
    f = weights_file(cfg.encoder, "encoder.safetensors")
    meta = sidecar(f)
    if meta.get("arch") != cfg.arch:
        raise SystemExit(f"--encoder {f} holds a {meta.get('arch')} backbone but --arch is "
                         f"{cfg.arch}; pass --arch {meta.get('arch')}")
    if meta.get("data_fingerprint") != ds.fingerprint():
        what = " (the embedded SYNTHETIC set)" if meta.get("synthetic_data") else ""
        Reporter.log_line(f"warning: --encoder {f} was pretrained on other images than --data"
                          f"{what}; whether it has seen this run's test images cannot be checked")
    elif meta.get("test_fingerprint") != ds.fingerprint(ds.test_idx):
        raise SystemExit(
            f"--encoder {f} was pretrained on this data with another train/test split "
            f"(--split-seed {meta.get('split_seed')} --test-fraction {meta.get('test_fraction')}; "
            f"this run: --split-seed {cfg.data.split_seed} --test-fraction "
            f"{cfg.data.test_fraction}): the encoder has seen images this split would test on. "
            f"Rerun with --split-seed {meta.get('split_seed')} --test-fraction "
            f"{meta.get('test_fraction')}.")
    elif meta.get("pretrain_split") == "all":
        Reporter.log_line(f"warning: --encoder {f} was pretrained with --split all: it has seen "
                          "the test images (without labels); the test split is not unseen")
    return f


def choose_subset(cfg: FinetuneConfig, ds: Dataset, run: Path) -> np.ndarray:
    """The --fraction subset of the training split (nested, stratified), saved as subset.json."""
    idx = fraction_subset(ds.train_idx, ds.labels, ds.groups, cfg.fraction, cfg.seed)
    counts = Counter(ds.labels[i] for i in idx)
    few = {c: n for c, n in sorted(counts.items()) if n < FEW_IMAGES}
    if few:
        listed = ", ".join(f"{c!r}: {n}" for c, n in few.items())
        Reporter.log_line(f"warning: --fraction {cfg.fraction} leaves few training images in "
                          f"{listed}; expect noisy metrics")
    save_json({"fraction": cfg.fraction, "seed": cfg.seed, "n": len(idx), "per_class": counts,
               "fingerprint": ds.fingerprint(idx), "train": [ds.records[i].rel for i in idx]},
              run / "subset.json")
    return idx


def build_step(cfg: FinetuneConfig, res: Resolved, n_classes: int, encoder: Path | None) -> Step:
    torch.manual_seed(cfg.seed)  # the head's initialisation (and a random backbone's)
    net = backbone(cfg.arch, str(encoder) if encoder else cfg.init, cfg.imagenet_weights)
    model = Classifier(net, ARCHS[cfg.arch], n_classes).to(res.device)
    if res.channels_last:
        model.to(memory_format=torch.channels_last)
    on_gpu = res.device.startswith("cuda")
    # The whole network is fine-tuned, as in the paper.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay,
                          **({"fused": True} if on_gpu else {"foreach": True}))
    forward = torch.compile(model) if res.compile else model
    return Step(model, forward, opt, cfg.label_smoothing, res.autocast)


def sources(cfg: FinetuneConfig, res: Resolved, ds: Dataset, subset: np.ndarray):
    """The training source (augmented, shuffled) and the test source (plain resize, in order)."""
    train = labelled_source(np.asarray(ds.images[subset]), ds.targets[subset], cfg, res, True)
    test = labelled_source(np.asarray(ds.images[ds.test_idx]), ds.targets[ds.test_idx], cfg, res,
                           False)
    return train, test


# Fields that may change between a run and its resumption without changing its meaning.
# Unlike pretraining, `epochs` is not one of them: it sets the length of the cosine schedule.
RESUMABLE = {"log_every", "resume", "device", "compile", "out", "name"}


def resume_key(cfg: FinetuneConfig) -> str:
    return config_hash({k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE})


def finetune(cfg: FinetuneConfig) -> Path:
    check(cfg)
    res = resolve(cfg)
    if res.world_size > 1:
        raise SystemExit("sstl finetune runs in one process; launch it without torchrun")
    ds = load_dataset(cfg.data, need_labels=True, log=Reporter.log_line)
    check_positive(ds.class_names, cfg.positive_class)
    encoder = check_encoder(cfg, ds)  # refusals come before the run directory exists
    run = make_run_dir(cfg.out, cfg.name, f"finetune-{cfg.arch}")
    save_data_files(ds, run)
    subset = choose_subset(cfg, ds, run)
    train, test = sources(cfg, res, ds, subset)
    st = build_step(cfg, res, len(ds.class_names), encoder)
    ckpt_path = run / "checkpoint.pt"
    epoch, best_probs = 0, None
    if cfg.resume and ckpt_path.exists():
        epoch, best_probs = load_checkpoint(ckpt_path, cfg, st)
        Reporter.log_line(f"resuming {run} after epoch {epoch}")
    start = str(encoder) if encoder else cfg.init
    write_config(run, cfg, res, {"start": start, "n_train": len(subset), "n_test": len(test.images),
                                 "steps_per_epoch": train.steps_per_epoch,
                                 "class_names": ds.class_names,
                                 "data": {"synthetic": ds.synthetic, "root": str(ds.root),
                                          "fingerprint": ds.fingerprint()}})
    metrics = MetricsCSV(run / "metrics.csv")
    metrics.truncate(epoch)
    rep = Reporter(cfg.epochs * train.steps_per_epoch, f"finetune {cfg.arch}",
                   done=epoch * train.steps_per_epoch)
    y_test = ds.targets[ds.test_idx]
    try:
        for epoch in range(epoch, cfg.epochs):
            row = {"epoch": epoch, **train_epoch(st, cfg, train, epoch, rep)}
            t0 = time.perf_counter()
            st.model.eval()
            probs = class_probs(st.forward, (x for x, _ in test.epoch(0)), st.autocast)
            probs = probs.cpu().numpy()  # the epoch's one transfer to the host
            row.update(classification_metrics(y_test, probs.argmax(1), probs, ds.class_names,
                                              cfg.positive_class))
            metrics.append({**row, "eval_seconds": time.perf_counter() - t0})
            if best_epoch(metrics.rows())[0] == epoch:
                best_probs = probs
            save_model(run, cfg, st.model, ds, epoch + 1, start)
            atomic_save(checkpoint(st, epoch + 1, cfg, best_probs), ckpt_path)
            Reporter.log_line(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(
                f"{k} {row[k]:.4f}" for k in ("loss", *METRICS)))
    except KeyboardInterrupt:
        rep.interrupted(ckpt_path)
    rep.close()
    finish(run, cfg, ds, metrics.rows(), best_probs, start, len(subset))
    return run


def train_epoch(st: Step, cfg: FinetuneConfig, source, epoch: int,
                rep: Reporter) -> dict:
    st.model.train()
    steps, total = source.steps_per_epoch, cfg.epochs * source.steps_per_epoch
    t0, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=source.device)
    for i, (x, y) in enumerate(source.epoch(epoch)):
        lr = lr_at(cfg, epoch * steps + i, total)
        for group in st.opt.param_groups:
            group["lr"] = lr
        loss_sum += train_step(st, x, y)
        seen += x.shape[0]
        if (i + 1) % cfg.log_every == 0 or i + 1 == steps:
            mean = (loss_sum / (i + 1)).item()  # the loop's only host sync
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss became {mean} at epoch {epoch} step {i}; "
                                         "lower --lr")
            rep.update(epoch * steps + i + 1, f"epoch {epoch + 1}/{cfg.epochs} loss {mean:.4f} "
                                              f"{seen / (time.perf_counter() - t0):,.0f} img/s")
    seconds = time.perf_counter() - t0
    return {"loss": (loss_sum / steps).item(), "lr": lr, "images_per_s": seen / seconds,
            "train_seconds": seconds}


def checkpoint(s: Step, epoch: int, cfg: FinetuneConfig, best_probs) -> dict:
    """All state needed to continue at an epoch boundary (order and augmentation are stateless)."""
    return {"model": s.model.state_dict(), "opt": s.opt.state_dict(), "epoch": epoch,
            "resume_key": resume_key(cfg), "torch_rng": torch.get_rng_state(),
            "best_probs": None if best_probs is None else torch.from_numpy(best_probs)}


def load_checkpoint(path: Path, cfg: FinetuneConfig, s: Step) -> tuple[int, np.ndarray | None]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["resume_key"] != resume_key(cfg):
        raise SystemExit(f"{path} was written by a run with different settings; "
                         "use another --name (or --no-resume to start over here)")
    s.model.load_state_dict(ck["model"])
    s.opt.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["torch_rng"])
    best = ck["best_probs"]
    return ck["epoch"], None if best is None else best.numpy()


def save_model(run: Path, cfg: FinetuneConfig, model: Classifier, ds: Dataset, epoch: int,
               start: str) -> None:
    """model.safetensors + model.json: everything `sstl predict` / `evaluate` need to use it."""
    save_weights(model.state_dict(), run / "model.safetensors", {
        "kind": "sstl-classifier", "arch": cfg.arch, "class_names": ds.class_names,
        "positive_class": cfg.positive_class, "image_size": cfg.augment.size,
        "cache_size": cfg.data.cache_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "input": "grayscale replicated to 3 channels, resized square, ImageNet-normalised",
        "epoch": epoch, "start": start, "fraction": cfg.fraction, "config_hash": config_hash(cfg),
        "split_seed": cfg.data.split_seed, "test_fraction": cfg.data.test_fraction,
        "data_fingerprint": ds.fingerprint(), "test_fingerprint": ds.fingerprint(ds.test_idx),
        "synthetic_data": ds.synthetic})


def finish(run: Path, cfg: FinetuneConfig, ds: Dataset, rows: list[dict], best_probs,
           start: str, n_train: int) -> dict:
    """summary.json, the best epoch's figures, and the table: what a reader looks at first."""
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
        "class_names": ds.class_names, "n_train": n_train, "n_test": int(len(ds.test_idx)),
        "fraction": cfg.fraction, "start": start, "arch": cfg.arch,
        "image_size": cfg.augment.size, "synthetic_data": ds.synthetic}
    save_json(summary, run / "summary.json")
    if best_probs is not None:
        draw_figures(run, ds.targets[ds.test_idx], best_probs, ds.class_names, cfg.positive_class,
                     f"best epoch {int(rows[b]['epoch']) + 1} by {by.upper()}")
    Console().print(summary_table(summary, f"{cfg.arch} from {Path(start).name}, "
                                           f"fraction {cfg.fraction}: {run}"))
    return summary


def draw_figures(folder: Path, y_true, probs, class_names: list[str], positive: str,
                 what: str) -> None:
    """confusion_matrix.png (Figure 4's form) and roc.png (positive vs rest) into `folder`."""
    cm = confusion(y_true, probs.argmax(1), len(class_names))
    confusion_png(cm, class_names, folder / "confusion_matrix.png", f"Confusion matrix, {what}")
    pos = class_names.index(positive)
    is_pos = np.asarray(y_true) == pos
    auc = auc_score(is_pos, probs[:, pos])
    fpr, tpr = roc_points(is_pos, probs[:, pos]) if not np.isnan(auc) else ([0], [0])
    roc_png(np.asarray(fpr), np.asarray(tpr), auc, folder / "roc.png",
            f"ROC, {positive} vs rest, {what}")


def summary_table(summary: dict, title: str) -> Table:
    last, best = summary["last_epochs"], summary["best"]
    n = len(summary["last_epochs_used"])
    t = Table(title=title)
    t.add_column("metric")
    t.add_column(f"mean ± std, last {n} epoch{'s' * (n > 1)}", justify="right")
    t.add_column(f"best epoch ({best['epoch'] + 1}, by {best['by'].upper()})", justify="right")
    for k in last:
        name = NAMES.get(k, k.replace("recall/", "recall "))
        t.add_row(name, f"{last[k]['mean']:.4f} ± {last[k]['std']:.4f}", f"{best[k]:.4f}")
    return t
