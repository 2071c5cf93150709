"""`sstl supervised`: the paper's stage 1, a classifier trained with fine-tuning's step.

Stage 1 of the paper is the backbone's supervised start on natural images (ImageNet, through
torchvision's weights). `sstl supervised --data FOLDER` trains it on any class-folder set,
the same way fine-tuning trains (one loop, `engine/loop.py`), and writes encoder.safetensors,
which `--init PATH`, `sstl pretrain --init` and `sstl finetune --encoder` accept. Where
ImageNet weights cannot be had, CIFAR-10 stands in: the run records which start it is.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from . import dist
from .classifier import check_start, classifier_trainer, eval_probs
from .command import begin, data_record, load_data, run_name
from .config import Resolved, SupervisedConfig, check, resolve
from .data.backends import labelled_source
from .loop import Plan, fit
from .inputs import run_inputs
from .record import encoder_sidecar, save_weights
from .runs import Run, log


def default_name(cfg: SupervisedConfig) -> str:
    return run_name(cfg, f"supervised-{cfg.arch}")


def supervised(cfg: SupervisedConfig) -> Path:
    """Stage 1: train backbone + head on labelled images; held-out top-1 after every epoch."""
    cfg = check(cfg)
    res = resolve(cfg.runtime, cfg.batch_size)
    check_start(cfg.arch, cfg.init, cfg.imagenet_weights)
    with dist.group(res):  # torchrun: join the other processes for the run
        return _supervised(cfg, res)


def _supervised(cfg: SupervisedConfig, res: Resolved) -> Path:
    t_data = time.perf_counter()
    ds = load_data(cfg, need_labels=True)
    with Run.open(cfg.runtime.out, cfg.runtime.name or default_name(cfg), res.is_main) as run:
        run.add_time("data", time.perf_counter() - t_data)  # scan and cache
        inputs = run_inputs(ds.identity(), init=cfg.init)  # its resume check and config
        begin(run, cfg, ds, inputs)
        train = labelled_source(np.asarray(ds.images[ds.train_idx]), ds.targets[ds.train_idx],
                                cfg, res, True)
        # Every rank scores the whole held-out split (the same number on each).
        test = labelled_source(np.asarray(ds.images[ds.test_idx]), ds.targets[ds.test_idx],
                               cfg, dataclasses.replace(res, rank=0, world_size=1), False)
        t = classifier_trainer(cfg.arch, cfg.init, cfg.imagenet_weights, len(ds.class_names),
                               res, lr=cfg.lr, schedule=cfg.schedule, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay,
                               label_smoothing=cfg.label_smoothing, seed=cfg.runtime.seed,
                               total_steps=cfg.epochs * train.steps_per_epoch)
        run.write_config(cfg, res, {"n_train": len(ds.train_idx), "n_test": len(ds.test_idx),
                                    "class_names": ds.class_names,
                                    "data": data_record(ds), "inputs": inputs})
        y_test = ds.targets[ds.test_idx]

        def evaluate(epoch: int) -> dict:
            t0 = time.perf_counter()
            acc = float((eval_probs(t, test).argmax(1) == y_test).mean())
            log(f"epoch {epoch + 1}/{cfg.epochs}: held-out top-1 {acc:.4f}")
            run.add_time("evaluate", time.perf_counter() - t0)
            return {"test_top1": acc, "eval_seconds": time.perf_counter() - t0}

        rows = fit(run, t, train, Plan.of(cfg, desc=f"supervised {cfg.arch}",
                                          on_epoch_end=evaluate, live=res.is_main,
                                          inputs=inputs))
        if res.is_main:
            # Stage 1 on X-rays is possible: its images then reach finetune's leak check too.
            save_weights(t.model.encoder.state_dict(), run.path / "encoder.safetensors",
                         encoder_sidecar(cfg, ds, ds.train_idx, cfg.epochs, stage="supervised",
                                         method="supervised", class_names=ds.class_names,
                                         test_top1=float(rows[-1]["test_top1"]),
                                         note="stage 1 (supervised, natural images): a "
                                              "stand-in for ImageNet weights"))
            log(f"done: {run.path / 'encoder.safetensors'} (held-out top-1 "
                f"{float(rows[-1]['test_top1']):.4f})")
        dist.barrier()  # under torchrun every rank returns once the encoder exists
        return run.path
