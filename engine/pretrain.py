"""Self-supervised pretraining: the step, then the loop that owns all state worth saving."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import kernels
from .config import PretrainConfig, Resolved, config_hash, resolve, to_dict
from .data.backends import two_view_source
from .data.dataset import load_dataset, save_data_files
from .methods import Cross
from .models import ARCHS, backbone
from .runs import MetricsCSV, Reporter, atomic_save, make_run_dir, save_weights, write_config


@dataclass
class Step:
    """What one training step needs besides the batch (built once per run)."""

    method: Cross
    predict: callable  # method.predict, compiled or not
    target_project: callable  # method.target_project, compiled or not
    opt: torch.optim.Optimizer
    online: kernels.FlatParams  # online encoder+projector as one flat buffer
    target: kernels.FlatParams  # target encoder+projector, same layout
    tau: float
    autocast: callable  # () -> context manager


def ssl_step(s: Step, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """One step of the method, in the order the paper describes it. No host sync.

    Returns [loss, spread] on the device; spread watches for collapse (see `spread`).
    """
    with s.autocast():
        # Online network: both views in one batch (one pass, one compiled graph).
        p1, p2 = s.predict(torch.cat([v1, v2])).chunk(2)
        # Target network: view 2 only (L2 compares P2 with Y2'); no gradients.
        y2 = s.target_project(v2)
        # L = L1 + L2 = (2 - 2cos(P1, P2)) + (2 - 2cos(P2, Y2')), batch mean, fused kernel.
        loss = s.method.loss(p1, p2, y2)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    # Target <- tau * target + (1 - tau) * online, over one flat buffer, in place.
    kernels.ema_(s.target, s.online, s.tau)
    # Metrics stay on the device; the loop reads them every --log-every steps.
    return torch.stack([loss.detach(), spread(p1.detach())])


def spread(p: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of the L2-normalised predictions across the batch, times sqrt(D).

    About 1 while predictions use every direction, 0 when they collapse to one vector, the
    failure mode of non-contrastive methods (SimSiam, Chen & He 2021, section 4.1).
    """
    z = torch.nn.functional.normalize(p.float(), dim=1)
    return z.std(0).mean() * z.shape[1] ** 0.5


def build_method(cfg: PretrainConfig, res: Resolved) -> Cross:
    torch.manual_seed(cfg.seed)  # heads' initialisation
    net = backbone(cfg.arch, cfg.init, cfg.imagenet_weights)
    method = Cross(net, ARCHS[cfg.arch], cfg.proj_hidden, cfg.proj_dim, cfg.pred_hidden,
                   cfg.target_bn, cfg.target_bn_momentum).to(res.device)
    if res.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def build_step(cfg: PretrainConfig, res: Resolved, method: Cross) -> Step:
    # Flatten after .to(device) and before the optimizer and compile: all three then see
    # the same storage, which the one-launch EMA updates in place.
    online_t, target_t = method.ema_tensors()
    online, target = kernels.FlatParams(online_t), kernels.FlatParams(target_t)
    online.check()
    target.check()
    on_gpu = res.device.startswith("cuda")
    params = list(method.online.parameters()) + list(method.predictor.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          **({"fused": True} if on_gpu else {"foreach": True}))
    predict, target_project = method.predict, method.target_project
    if res.compile:
        predict, target_project = torch.compile(predict), torch.compile(target_project)
    return Step(method, predict, target_project, opt, online, target, cfg.tau, res.autocast)


COLLAPSED = 0.02  # spread below this: predictions have (nearly) become one vector

# Fields that may change between a run and its resumption without changing its meaning.
RESUMABLE = {"epochs", "log_every", "checkpoint_every", "resume", "device", "compile", "backend",
             "out", "name"}


def resume_key(cfg: PretrainConfig) -> str:
    return config_hash({k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE})


def pretrain(cfg: PretrainConfig) -> Path:
    if cfg.split not in ("train", "all"):
        raise SystemExit(f"--split must be train or all, not {cfg.split!r}")
    res = resolve(cfg)
    method = build_method(cfg, res)  # first: missing weights fail before a long first scan
    run = make_run_dir(cfg.out, cfg.name, f"pretrain-{cfg.arch}")
    ds = load_dataset(cfg.data, log=Reporter.log_line)
    save_data_files(ds, run)
    images = ds.images[ds.train_idx] if cfg.split == "train" else ds.images
    source = two_view_source(np.asarray(images), cfg, res)
    st = build_step(cfg, res, method)
    ckpt_path = run / "checkpoint.pt"
    epoch, start = 0, 0
    if cfg.resume and ckpt_path.exists():
        epoch, start = load_checkpoint(ckpt_path, cfg, st)
        Reporter.log_line(f"resuming {run} at epoch {epoch}, step {start}")
    write_config(run, cfg, res, {"backend": res.backend, "n_train": len(images),
                                 "steps_per_epoch": source.steps_per_epoch,
                                 "data": {"synthetic": ds.synthetic, "root": str(ds.root),
                                          "fingerprint": ds.fingerprint()}})
    metrics = MetricsCSV(run / "metrics.csv")
    metrics.truncate(epoch)
    total = cfg.epochs * source.steps_per_epoch
    rep = Reporter(total, f"pretrain {cfg.arch}", done=epoch * source.steps_per_epoch + start)
    save = lambda e, i: atomic_save(checkpoint(st, e, i, cfg), ckpt_path)  # noqa: E731
    try:
        for epoch in range(epoch, cfg.epochs):
            t0, seen = time.perf_counter(), 0
            sums = torch.zeros(2, device=res.device)  # loss, spread
            for i, (v1, v2) in enumerate(source.epoch(epoch, start), start):
                sums += ssl_step(st, v1, v2)
                seen += v1.shape[0] * res.world_size
                if (i + 1) % cfg.log_every == 0 or i + 1 == source.steps_per_epoch:
                    mean, spr = (sums / (i + 1 - start)).tolist()  # the loop's only host sync
                    if not math.isfinite(mean):
                        raise FloatingPointError(f"loss became {mean} at epoch {epoch} step {i}; "
                                                 f"the last good checkpoint is {ckpt_path}")
                    rate = seen / (time.perf_counter() - t0)
                    rep.update(epoch * source.steps_per_epoch + i + 1,
                               f"epoch {epoch + 1}/{cfg.epochs} loss {mean:.4f} spread {spr:.2f} "
                               f"{rate:,.0f} img/s")
                if (i + 1) % cfg.checkpoint_every == 0 and i + 1 < source.steps_per_epoch:
                    save(epoch, i + 1)
            seconds = time.perf_counter() - t0
            loss, spr = (sums / max(1, source.steps_per_epoch - start)).tolist()
            metrics.append({"epoch": epoch, "steps": source.steps_per_epoch - start, "loss": loss,
                            "spread": spr, "images_per_s": seen / seconds, "seconds": seconds,
                            "lr": cfg.lr})
            if spr < COLLAPSED:
                Reporter.log_line(f"warning: prediction spread {spr:.3f} < {COLLAPSED}: the online "
                                  "predictions have collapsed toward one vector (see README)")
            start = 0
            save(epoch + 1, 0)
            save_encoder(run, cfg, method, ds, epoch + 1, (epoch + 1) * source.steps_per_epoch)
    except KeyboardInterrupt:
        rep.interrupted(ckpt_path)
    rep.close()
    Reporter.log_line(f"done: {run / 'encoder.safetensors'}")
    return run


def checkpoint(s: Step, epoch: int, step: int, cfg: PretrainConfig) -> dict:
    """All state a run needs to continue exactly; data order and augmentation are stateless."""
    return {"method": s.method.state_dict(), "opt": s.opt.state_dict(), "epoch": epoch,
            "step": step, "resume_key": resume_key(cfg), "torch_rng": torch.get_rng_state()}


def load_checkpoint(path: Path, cfg: PretrainConfig, s: Step) -> tuple[int, int]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["resume_key"] != resume_key(cfg):
        raise SystemExit(f"{path} was written by a run with different settings; "
                         "use another --name (or --no-resume to start over here)")
    s.method.load_state_dict(ck["method"])  # copies in place: the flat views stay valid
    s.opt.load_state_dict(ck["opt"])
    s.online.check()  # a load that re-allocated a tensor would detach it from the EMA
    s.target.check()
    torch.set_rng_state(ck["torch_rng"])
    return ck["epoch"], ck["step"]


def save_encoder(run: Path, cfg: PretrainConfig, method: Cross, ds, epoch: int, step: int) -> None:
    save_weights(method.encoder.state_dict(), run / "encoder.safetensors", {
        "kind": "sstl-encoder", "arch": cfg.arch, "init": cfg.init, "epoch": epoch, "step": step,
        "feat_dim": ARCHS[cfg.arch], "config_hash": config_hash(cfg),
        "split_seed": cfg.data.split_seed, "test_fraction": cfg.data.test_fraction,
        "data_fingerprint": ds.fingerprint(), "test_fingerprint": ds.fingerprint(ds.test_idx),
        "pretrain_split": cfg.split, "synthetic_data": ds.synthetic})
