"""Self-supervised pretraining (the paper's stage 2) for any method of `methods/`.

pretrain(cfg): check -> build the method (missing weights fail before the first scan) ->
open the run -> data -> the method's views -> fit (the shared loop) -> encoder.safetensors,
always written from the final checkpoint's state (also when a finished run is rerun).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import accel, dist
from .command import begin, data_record, load_data, run_name
from .config import PretrainConfig, Resolved, check, resolve
from .data.backends import ssl_source
from .loop import EMA, Plan, Trainer, fit, sgd
from .methods import METHODS, Method, build
from .models import ARCHS, backbone
from .inputs import run_inputs
from .record import encoder_sidecar, save_weights
from .runs import Run, log

COLLAPSED = 0.02  # spread below this: outputs have (nearly) become one vector


def build_method(cfg: PretrainConfig, res: Resolved) -> Method:
    torch.manual_seed(cfg.runtime.seed)  # heads' initialisation
    net = backbone(cfg.arch, cfg.init, cfg.imagenet_weights)
    method = build(cfg.method, net, ARCHS[cfg.arch], cfg.settings).to(res.device)
    if res.world_size > 1:  # BN statistics of the global batch, online and target alike
        dist.sync_batchnorm_(method, res.device.startswith("cuda"))
    if res.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def build_trainer(cfg: PretrainConfig, res: Resolved, method: Method, total_steps: int) -> Trainer:
    # Flatten the EMA pairs after .to(device) and before the optimizer and compile: all three
    # then see the same storage, which the one-launch EMA updates in place.
    online, target = method.ema_pairs()
    ema = EMA(online, target) if online else None
    opt = sgd(method.trainable(), cfg.lr, cfg.momentum, cfg.weight_decay, res.device)
    ddp = dist.data_parallel(method, res)  # gradients averaged over ranks (torchrun)
    forward = accel.compile_module(ddp) if res.compile else ddp
    graphs = res.graphs and method.graph_safe
    if res.graphs and not graphs and res.is_main:
        log(f"--method {cfg.method}: its step keeps host-side state ({method.graph_unsafe_why}); "
            "running it without CUDA graphs")
    return Trainer(model=method, forward=forward, opt=opt, autocast=res.autocast,
                   lr_at=lambda step: cfg.lr,  # the paper's constant rate
                   stats=method.stats, ema=ema,
                   tau_at=lambda step: method.tau(step, total_steps),
                   graphs=graphs, compiled=res.compile, dtype=res.dtype)


def default_name(cfg: PretrainConfig) -> str:
    """The same command names the same directory, so rerunning it resumes."""
    return run_name(cfg, f"pretrain-{cfg.method}-{cfg.arch}")


def pretrain(cfg: PretrainConfig) -> Path:
    cfg = check(cfg)
    res = resolve(cfg.runtime, cfg.batch_size, METHODS[cfg.method].cls.views)
    t0 = time.perf_counter()
    method = build_method(cfg, res)  # first: missing weights fail before a long first scan
    build_s = time.perf_counter() - t0
    with dist.group(res), \
            Run.open(cfg.runtime.out, cfg.runtime.name or default_name(cfg), res.is_main) as run:
        run.add_time("build", build_s)
        t0 = time.perf_counter()
        ds = load_data(cfg)
        inputs = run_inputs(ds.identity(), init=cfg.init)  # its resume check and config
        begin(run, cfg, ds, inputs)
        images = ds.images[ds.train_idx] if cfg.split == "train" else ds.images
        source = ssl_source(method.views, np.asarray(images), cfg, res)
        method.attach(len(images), cfg.runtime.seed)
        run.add_time("data", time.perf_counter() - t0)
        total = cfg.epochs * source.steps_per_epoch
        t0 = time.perf_counter()
        t = build_trainer(cfg, res, method, total)
        run.add_time("build", time.perf_counter() - t0)
        run.write_config(cfg, res, {"backend": res.backend, "n_train": len(images),
                                    "steps_per_epoch": source.steps_per_epoch,
                                    "data": data_record(ds), "inputs": inputs})
        rows = fit(run, t, source, Plan.of(cfg, desc=f"pretrain {cfg.method} {cfg.arch}",
                                           images_per_step=cfg.batch_size, live=res.is_main,
                                           inputs=inputs))
        if rows and "spread" in rows[-1] and float(rows[-1]["spread"]) < COLLAPSED:
            log(f"warning: spread {float(rows[-1]['spread']):.3f} < {COLLAPSED}: the outputs "
                "have collapsed toward one vector (see README, 'spread')")
        t0 = time.perf_counter()
        save_encoder(run, cfg, method, ds, cfg.epochs, total)
        run.add_time("report", time.perf_counter() - t0)
        log(f"done: {run.path / 'encoder.safetensors'}")
        dist.barrier()  # under torchrun every rank returns once the encoder exists (reproduce)
        return run.path


def save_encoder(run: Run, cfg: PretrainConfig, method: Method, ds, epoch: int, step: int) -> None:
    if not run.is_main:
        return
    seen = ds.train_idx if cfg.split == "train" else None  # None: every image
    save_weights(method.encoder.state_dict(), run.path / "encoder.safetensors",
                 encoder_sidecar(cfg, ds, seen, epoch, method=cfg.method, step=step,
                                 pretrain_split=cfg.split))
