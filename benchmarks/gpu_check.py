"""Every check that needs a GPU, in one command that fits a lent machine's minutes.

    bash benchmarks/gpu_run.sh [ARGS]
(gpu_run.sh: `python3 -m pip install --no-deps --no-build-isolation --no-index -e .`, or sstl
from the checkout when the machine's setuptools cannot build it; then this script with ARGS,
--out "$OUT". `python3 -m pip`: on the lent H200 a bare `pip` installs into another Python.)

Sections, most important first, each written into --out/gpu-check.json as soon as it ends
(one file, rewritten whole: a run cut short still returns what it finished, and a lent
machine sends back at most 8 files), then a short table:
  cuda      Triton loss (fp32/bf16/fp16, fwd+bwd) and EMA against float64 references on
            CUDA; one compiled bf16 step against the eager fp32 step (same loss, close weights)
  kernels   benchmarks/kernels.py: fused loss and EMA vs their baselines, vs copy bandwidth
  step      benchmarks/step.py: resnet50, batch 256, 2x112 views, every rung and the peer
  data      benchmarks/data.py: two-view samples/s (DALI rows skip where DALI is absent)
  methods   benchmarks/methods.py: every method's step, without and with CUDA graphs
  knobs     Cross's graphed step and the graphed fine-tuning step (batch 64) under backend
            settings (cuDNN autotuning, Inductor's 1x1 convolutions as matmuls, its
            coordinate-descent tuning, max-autotune), to choose defaults from measurements
  finetune  fine-tuning step images/s at 224x224, batch 256, bf16 + compile, +- CUDA graphs
  pretrain  `sstl pretrain` end to end for one epoch of resnet50 (synthetic images, 3,072)
  recipe    the paper's recipe end to end, twice, as a user types it: `sstl pretrain` (40
            epochs) then `sstl finetune` (30 epochs) on --data (cxr-dev-gray224); the second
            pass shows what the compile cache saves. Wall time, per-epoch img/s, timing.json
Sections are skipped once --budget seconds have passed, so the command ends in time. The
exit status is 1 when a section raised, a check failed or a recipe command exited non-zero
(gpu-check.json's `failed` says which). `--device cpu` is a smoke run of the cheap sections
(cuda, kernels, data, methods) here: `TRITON_INTERPRET=1 python -m sstl.benchmarks.gpu_check
--device cpu --only cuda` (about 2 minutes on 2 cores).

Issue 13 (CUDA graphs, compile cache, the fine-tune loop) on a lent GPU, in two commands that
each fit the 10-minute limit; first, here, `mkdir -p .data && cp -r
../shared/data/cxr-dev-gray224 .data/` (.data is git-ignored) and carry `.data`:
    bash benchmarks/gpu_run.sh --tests tests/test_graphs.py --only cuda methods
    bash benchmarks/gpu_run.sh --only finetune recipe --data .data/cxr-dev-gray224
Still to measure for issue 13 (the H200 session of 6bb7787 ran out of device time), one
command each, since step and recipe together may pass the 10-minute limit (the recipe
section alone took 303 s on the H200, issue13-nvidia-h200.json; step's two compiled rungs and
six eager ones were not timed there):
    bash benchmarks/gpu_run.sh --tests "tests/test_host_sync.py tests/test_graphs.py" \
        --only step                                  (the honest peer's ratio)
    bash benchmarks/gpu_run.sh --only recipe --data .data/cxr-dev-gray224
        (the recipe again, after the data path's host syncs went; gpu-check.json keeps
        each finished command if the limit cuts it)
    bash benchmarks/gpu_run.sh --only knobs --knobs defaults coordinate_descent_tuning max_autotune
A session lent 15 minutes of device time in all (each machine start costs 1-2 of them) has
room for one such command with time to rerun nothing: take the recipe, which measures issue
13's headline targets (per-epoch img/s of `sstl pretrain`, the recipe's wall time), with the
CUDA-graph tests first (small nets, no compile: under a minute; graphed steps that give wrong
numbers would not show in the recipe's timings), with a run timeout_s of about 540:
    bash benchmarks/gpu_run.sh --tests tests/test_graphs.py --only recipe \
        --data .data/cxr-dev-gray224
(On the H200, issue13-nvidia-h200.json, pass 1 took 204 s with its pretraining's compilation
already cached by an earlier section, which costs about 65 s cold; pass 2 took 99 s. Pass 2
starts while 60 s of the 480 s budget are left, and is cut at the budget.)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from .common import machine, write_json


def cuda_checks(device: str = "cuda", arch: str = "resnet50", batch: int = 64) -> dict:
    """Kernels vs float64 references and the fast step vs the eager one, on `device`.

    On a CPU (a smoke run of this script) Triton runs interpreted and bf16 is skipped.
    """
    import copy

    from sstl import kernels
    import dataclasses

    from sstl.engine.config import PretrainConfig, Runtime, check, resolve
    from sstl.engine.loop import train_step
    from sstl.engine.models import backbone
    from sstl.engine.pretrain import build_method, build_trainer
    from sstl.kernels.loss import CrossLoss

    out = {}
    dtypes = ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3))
    for dtype, tol in dtypes if device == "cuda" else dtypes[::2]:
        for B, D in ((256, 128), (7, 130)):
            g = torch.Generator(device=device).manual_seed(B + D)
            p1, p2, y2 = (torch.randn(B, D, device=device, generator=g).to(dtype) for _ in range(3))
            a1, a2 = (t.detach().clone().requires_grad_(True) for t in (p1, p2))
            loss = CrossLoss.apply(a1, a2, y2, True)
            loss.backward()
            r1, r2 = (t.detach().double().requires_grad_(True) for t in (p1, p2))
            ref = kernels.cross_loss_reference(r1, r2, y2.double())
            ref.backward()
            err = max(abs(loss.item() - ref.item()) / abs(ref.item()),
                      *((a.grad.double() - r.grad).norm().item() / r.grad.norm().item()
                        for a, r in ((a1, r1), (a2, r2))))
            out[f"loss {str(dtype)[6:]} B={B} D={D}"] = {"rel_err": err, "ok": err < tol}
    for dtype, tol in dtypes if device == "cuda" else dtypes[::2]:  # BYOL/SimSiam's kernel
        g = torch.Generator(device=device).manual_seed(5)
        a, b = (torch.randn(512, 256, device=device, generator=g).to(dtype) for _ in range(2))
        a1 = a.detach().clone().requires_grad_(True)
        loss = kernels.cosine_loss(a1, b)
        loss.backward()
        r = a.detach().double().requires_grad_(True)
        ref = kernels.cosine_loss_reference(r, b.double())
        ref.backward()
        err = max(abs(loss.item() - ref.item()) / abs(ref.item()),
                  (a1.grad.double() - r.grad).norm().item() / r.grad.norm().item())
        out[f"cosine loss {str(dtype)[6:]} B=512 D=256"] = {"rel_err": err, "ok": err < tol}
    net = backbone(arch).to(device)
    tgt = copy.deepcopy(net)
    fo, ft = kernels.FlatParams(net.parameters()), kernels.FlatParams(tgt.parameters())
    with torch.no_grad():
        fo.flat.normal_()
    want = 0.996 * ft.flat.double() + 0.004 * fo.flat.double()
    kernels.ema_triton_(ft, fo, 0.996)
    err = ((ft.flat.double() - want).norm() / want.norm()).item()
    out[f"ema fp32 {arch}"] = {"rel_err": err, "ok": err < 1e-6}
    # The fast step (compiled, bf16, channels_last, Triton) vs the eager fp32 step.
    cfg = check(PretrainConfig(arch=arch, init="random",
                               runtime=Runtime(device=device, backend="torch")))
    losses = {}
    for name, compile_, precision in (("eager fp32", False, "fp32"), ("fast bf16", True, "bf16")):
        c = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, compile=compile_,
                                                                 precision=precision))
        res = resolve(c.runtime, c.batch_size)
        m = build_method(c, res)
        t = build_trainer(c, res, m, total_steps=10)
        g = torch.Generator(device=device).manual_seed(1)
        v1, v2 = (torch.randn(batch, 3, 112, 112, device=device, generator=g) for _ in range(2))
        train_step(t, (v1, v2), 0)  # warm-up/compile; the second step is compared
        losses[name] = train_step(t, (v1, v2), 1)[0].item()
    diff = abs(losses["fast bf16"] - losses["eager fp32"]) / abs(losses["eager fp32"])
    out["fast step vs eager step (loss)"] = {"rel_err": diff, "ok": diff < 5e-2, **losses}
    return out


KNOBS = {  # backend settings measured side by side; none is on by default
    "defaults": {},
    "cudnn_benchmark": {"cudnn.benchmark": True},
    "cudnn_benchmark+conv_1x1_as_mm": {"cudnn.benchmark": True, "conv_1x1_as_mm": True},
    # Inductor tunes the block sizes of its own (BatchNorm/ReLU) kernels: 13.9 of the H200
    # step's 26.9 ms of kernels are those, memory-bound.
    "coordinate_descent_tuning": {"coordinate_descent_tuning": True},
    # Inductor benchmarks Triton templates against cuDNN/cuBLAS for convolutions and matmuls.
    "max_autotune": {"max_autotune": True},
}


def knobs(names=None) -> dict:
    """Cross's graphed step (the methods bench) and the graphed fine-tuning step at batch 64
    (`sstl finetune`'s default), under each backend setting, one at a time."""
    import torch._inductor.config as inductor

    from . import methods

    rows = []
    for name in names or KNOBS:
        settings = KNOBS[name]
        torch.backends.cudnn.benchmark = settings.get("cudnn.benchmark", False)
        saved = {k: getattr(inductor, k) for k in settings if k != "cudnn.benchmark"}
        for k in saved:
            setattr(inductor, k, settings[k])
        try:
            r = methods.run(device="cuda", methods=["cross"], graphs=(True,))["rows"][0]
            f = finetune_step("cuda", "resnet50", 64, 224, 20, 6, graphs=True)
            rows.append({"variant": name, **r, "finetune_b64_images_per_s": f["images_per_s"]})
            print(f"  knobs {name:34s} {r['images_per_s']:9,.0f} img/s  fine-tune b64 "
                  f"{f['images_per_s']:7,.0f} img/s", flush=True)
        finally:
            torch.backends.cudnn.benchmark = False
            for k, v in saved.items():
                setattr(inductor, k, v)
    return {"rows": rows}


def finetune_throughput(device: str = "cuda", arch: str = "resnet50", batch: int = 256,
                        size: int = 224, steps: int = 20, warmup: int = 6) -> dict:
    return {"rows": [finetune_step(device, arch, batch, size, steps, warmup, g)
                     for g in (False, True)]}


def finetune_step(device, arch, batch, size, steps, warmup, graphs: bool) -> dict:
    """Images/s of the fine-tuning step as `sstl finetune` builds it (a resident batch)."""
    from sstl.engine.config import DataConfig, FinetuneAugment, FinetuneConfig, Runtime, check, resolve
    from sstl.engine.data.dataset import load_dataset
    from sstl.engine.data.loader import LabelledSource
    from sstl.engine.finetune import build_trainer
    from sstl.engine.loop import stepper

    from .common import median_seconds, sync

    torch._dynamo.reset()  # a fresh compilation under the knobs section's settings
    cfg = check(FinetuneConfig(data=DataConfig(), arch=arch, init="random", batch_size=batch,
                               augment=FinetuneAugment(size=size),
                               runtime=Runtime(device=device, cuda_graphs=graphs)))
    res = resolve(cfg.runtime, cfg.batch_size)
    ds = load_dataset(cfg.data, need_labels=True, log=lambda m: None)
    src = LabelledSource(ds.images, ds.targets, batch, size, res.device, cfg.augment.train,
                         dtype=getattr(torch, res.dtype), channels_last=res.channels_last)
    t = build_trainer(cfg, res, len(ds.class_names), None, total_steps=10 ** 6)
    x, y = next(src.epoch(0))
    reps = max(1, -(-batch // len(x)))
    x, y = x.repeat(reps, 1, 1, 1)[:batch], y.repeat(reps)[:batch]  # a full batch from 256 images
    one = stepper(t)
    for i in range(warmup):
        one((x, y), i)
    sync(res.device)
    sec, all_sec = median_seconds(lambda: one((x, y), 0), res.device, steps, 3)
    return {"graphs": t.graphs, "images_per_s": batch / sec, "ms_per_step": sec * 1e3,
            "batch": batch, "size": size, "target_6000": batch / sec >= 6000,
            "note": "model step only, batch resident"}


def pretrain_epoch() -> dict:
    from sstl.engine.config import DataConfig, PretrainConfig, Runtime
    from sstl.engine.data.synthetic import ensure_synthetic
    from sstl.engine.pretrain import pretrain

    data = ensure_synthetic(Path("/tmp/sstl-synthetic-3072"), per_class=768)
    t0 = time.perf_counter()
    run = pretrain(PretrainConfig(data=DataConfig(path=str(data)), arch="resnet50", init="random",
                                  epochs=1, runtime=Runtime(
                                      out=tempfile.mkdtemp(prefix="sstl-epoch-"),  # not --out
                                      name="gpu-epoch", resume=False)))
    wall = time.perf_counter() - t0
    rows = (run / "metrics.csv").read_text().splitlines()
    return {"wall_s_including_compile": wall, "metrics_csv": rows,
            "config": json.loads((run / "config.json").read_text())["resolved"]}


def recipe(data: str | None, deadline: float, passes: int = 2, least_s: float = 60,
           partial: Callable[[dict], None] = lambda rows: None) -> dict:
    """The paper's recipe as a user runs it (subprocesses, so the compile cache is the real
    on-disk one): pretrain 40 epochs, then fine-tune 30 epochs on all labels.

    `deadline` (time.perf_counter()) bounds every command: one that would run past it is
    stopped and counted as rc 124. A command that fails ends the recipe (the next one needs
    its output). A pass starts while `least_s` are left: the second one's warm compile cache
    makes it much shorter than the first, and a second pass cut at the deadline still has its
    finished epochs' img/s (not a failure: the first pass measured the recipe). `partial`
    gets the rows after each command, so a session killed at its limit keeps them."""
    import sys

    if not data or not Path(data).exists():  # failures() counts it: nothing was measured
        return {"skipped": f"--data {data!r} not found (copy cxr-dev-gray224 into the checkout)"}
    # The run directories (checkpoints and weights, hundreds of MB) stay outside --out, which
    # a lent machine sends back with a limit on size and on the number of files; what the
    # runs recorded goes into the rows (_run_facts).
    runs = Path(tempfile.mkdtemp(prefix="sstl-recipe-runs-"))
    rows: list[dict] = []
    for i in range(passes):
        left = deadline - time.perf_counter()
        if left < least_s:
            if not rows:  # pass 1 cannot finish: say so, do not start it
                return {"skipped": f"{left:.0f}s of --budget left, too little for the recipe",
                        "data": data}
            rows.append({"pass": i + 1, "skipped": f"{left:.0f}s of --budget left"})
            break
        row = {"pass": i + 1}
        for cmd, name, extra in (
                ("pretrain", f"pretrain-{i}", ["--init", "random"]),  # no ImageNet offline
                ("finetune", f"finetune-{i}", ["--encoder", str(runs / f"pretrain-{i}"),
                                               "--fraction", "1.0"])):
            argv = [sys.executable, "-m", "sstl.cli.main", cmd, "--data", data, "--out", str(runs),
                    "--name", name, "--no-resume", *extra]
            t0 = time.perf_counter()
            rc, err = run_bounded(argv, max(1.0, deadline - t0))
            tail = (f"stopped at the deadline: {err[-1500:]}" if rc == 124 else err[-1500:])
            wall = time.perf_counter() - t0
            run = runs / name
            row[cmd] = {"wall_s": wall, "rc": rc, "tail": tail, **_run_facts(run)}
            partial({"rows": rows + [row], "data": data})
            if rc != 0:
                break
        rows.append(row)
        if rc != 0:  # the last command run failed: what follows would need its output
            break
    return {"rows": rows, "data": data}


def run_bounded(argv: list[str], timeout: float, grace: float = 15.0) -> tuple[int, str]:
    """(exit status, stderr) of a command given `timeout` seconds. Past it, its whole process
    group (compile and data loader workers) gets SIGTERM, then SIGKILL after `grace` seconds,
    and the status is 124: a killed child alone would leave its workers holding the GPU."""
    import contextlib
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        err = proc.communicate(timeout=timeout)[1]
        return proc.returncode, err or ""
    except subprocess.TimeoutExpired:
        pass
    err = ""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):  # the group is gone
            os.killpg(proc.pid, sig)
        try:
            err = proc.communicate(timeout=wait)[1]
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers that outlived a stopped command
        os.killpg(proc.pid, signal.SIGKILL)
    return 124, err or ""


def _run_facts(run: Path) -> dict:
    """What a recipe command's run directory recorded, without its weights: timing.json,
    metrics.csv's rows, config.json's resolved settings and summary.json."""
    import csv

    facts = {}
    for name in ("timing.json", "summary.json"):
        if (run / name).exists():
            facts[name.removesuffix(".json")] = json.loads((run / name).read_text())
    if (run / "config.json").exists():
        facts["resolved"] = json.loads((run / "config.json").read_text()).get("resolved")
    if (run / "metrics.csv").exists():
        with open(run / "metrics.csv") as f:
            table = list(csv.DictReader(f))
        rates = [float(r["images_per_s"]) for r in table]
        facts["metrics"], facts["images_per_s_epochs"] = table, rates
        if len(rates) > 1:  # the first epoch holds compilation and capture
            facts["images_per_s_median_after_first"] = sorted(rates[1:])[len(rates[1:]) // 2]
    return facts


SECTIONS = ("cuda", "kernels", "step", "data", "methods", "knobs", "finetune", "pretrain",
            "recipe")
GPU_ONLY = ("step", "knobs", "finetune", "pretrain", "recipe")  # resnet50-sized: no CPU smoke


def failures(name: str, section: dict) -> list[str]:
    """What went wrong in a finished section: its exception, a check that failed, a command
    of the recipe that exited non-zero. Any of them makes the script exit 1."""
    if "error" in section:
        return [section["error"]]
    result = section.get("result") or {}
    out = []
    if name == "cuda":
        out += [f"check {k} failed (rel_err {v.get('rel_err')})" for k, v in result.items()
                if isinstance(v, dict) and v.get("ok") is False]
    if name == "recipe":
        out += [f"skipped: {result['skipped']}"] if "skipped" in result else []
        out += [f"pass {r.get('pass')} {cmd} exited {r[cmd].get('rc')}"
                for r in result.get("rows", []) for cmd in ("pretrain", "finetune")
                if isinstance(r.get(cmd), dict) and r[cmd].get("rc") not in (0, None)
                and not (r.get("pass", 1) > 1 and r[cmd].get("rc") == 124)]  # cut: recorded
    return out


class Results:
    """--out/gpu-check.json: the machine, every section so far and what failed, rewritten
    whole (write_json: atomic, strict) whenever a section or a recipe command ends."""

    def __init__(self, out: Path):
        self.path, self.data = out / "gpu-check.json", {"machine": machine()}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        write_json(self.data, self.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu-check.json")
    p.add_argument("--budget", type=float, default=480,
                   help="seconds after which sections skip and recipe commands are stopped")
    p.add_argument("--only", nargs="*", default=None, choices=SECTIONS,
                   help="run only these sections")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a smoke run of the cheap sections (TRITON_INTERPRET=1 for the "
                        "kernels); the resnet50-sized sections are skipped there")
    p.add_argument("--data", default=None, help="labelled set for the recipe section")
    p.add_argument("--knobs", nargs="*", default=None, choices=list(KNOBS),
                   help="the knobs section's variants (default: all)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from . import data, kernels, methods, step

    dev = a.device
    sections = {
        "cuda": lambda: cuda_checks(dev) if dev == "cuda" else cuda_checks(dev, "resnet18", 8),
        "kernels": lambda: kernels.run(dev),
        "step": lambda: step.run(device=dev, arch="resnet50", batch_size=256, view_size=112),
        "data": lambda: data.run(device=dev),
        "methods": lambda: methods.run(device=dev, methods=["cross", "byol", "simsiam",
                                                             "simclr"],
                                       **({"graphs": (False, True)} if dev == "cuda" else
                                          {"graphs": (False,), "arch": "resnet18"})),
        "knobs": lambda: knobs(a.knobs),
        "finetune": finetune_throughput,
        "pretrain": pretrain_epoch,
        "recipe": lambda: recipe(a.data, deadline=t0 + a.budget,
                                 partial=lambda rows: results.put("recipe", {"partial": rows})),
    }
    assert tuple(sections) == SECTIONS
    t0, results, failed = time.perf_counter(), Results(out), {}  # recipe reads t0
    summary = results.data
    for name, fn in sections.items():
        if a.only and name not in a.only:
            continue
        if time.perf_counter() - t0 > a.budget:
            summary[name] = {"skipped": f"budget of {a.budget:.0f}s spent"}
            continue
        if dev != "cuda" and name in GPU_ONLY:
            summary[name] = {"skipped": "needs a GPU"}
            continue
        s0 = time.perf_counter()
        try:
            summary[name] = {"result": fn()}
        # One broken section must not cost the others' minutes. SystemExit with a message
        # too: the engine's refusals (ConfigError, DataError, a diverged run) are those.
        except (Exception, SystemExit) as e:
            if isinstance(e, SystemExit) and not isinstance(e.code, str):
                # An exit status (130: Ctrl-C, or the lease's SIGTERM): stop now, with what
                # finished written down.
                summary[name] = {**summary.get(name, {}),
                                 "error": f"interrupted (exit {e.code})"}
                results.put("failed", {**failed, name: [summary[name]["error"]]})
                raise
            # A recipe's finished commands (its partial rows) stay beside the error.
            summary[name] = {**summary.get(name, {}), "error": f"{type(e).__name__}: {e}",
                             "trace": traceback.format_exc()}
        summary[name]["seconds"] = time.perf_counter() - s0
        bad = failures(name, summary[name])
        if bad:
            failed[name] = bad
        results.put("failed", failed)
        print(f"[{time.perf_counter() - t0:6.0f}s] {name}: "
              f"{'FAILED: ' + '; '.join(bad) if bad else 'done'}", flush=True)
    results.put("failed", failed)
    print_summary(summary)
    if failed:  # a broken session must not look like a successful one to whoever runs it
        raise SystemExit(f"gpu_check: {len(failed)} section(s) failed: {', '.join(failed)}")


def print_summary(summary: dict) -> None:
    print(f"\n{summary['machine'].get('gpu')} torch {summary['machine']['torch']} "
          f"git {summary['machine']['git_sha']}")
    cuda = summary.get("cuda", {}).get("result", {})
    for k, v in cuda.items():
        print(f"  check {k:40s} rel_err {v['rel_err']:.2e} {'ok' if v['ok'] else 'FAIL'}")
    for r in summary.get("step", {}).get("result", {}).get("rows", []):
        if "images_per_s" in r:
            print(f"  step {r['rung']:16s} {r['images_per_s']:9,.0f} img/s  "
                  f"{r.get('x_peer', 0):5.2f}x peer  MFU {r['mfu']:.3f}")
    for t in summary.get("kernels", {}).get("result", {}).get("targets", []):
        print(f"  kernels {t['name']:40s} {t['value']} (>= {t['target']}) met={t['met']}")
    for r in summary.get("methods", {}).get("result", {}).get("rows", []):
        print(f"  method {r['method']:10s} graphs {str(r.get('graphs')):5s} "
              f"{r.get('images_per_s', 0):9,.0f} img/s  warm-up {r.get('warmup_s', 0):5.1f} s")
    for r in summary.get("knobs", {}).get("result", {}).get("rows", []):
        print(f"  knobs {r['variant']:34s} {r['images_per_s']:9,.0f} img/s  "
              f"warm-up {r['warmup_s']:5.1f} s  fine-tune b64 "
              f"{r.get('finetune_b64_images_per_s', 0):7,.0f} img/s")
    for r in summary.get("finetune", {}).get("result", {}).get("rows", []):
        print(f"  finetune 224 graphs {str(r['graphs']):5s} {r['images_per_s']:9,.0f} img/s")
    for r in summary.get("recipe", {}).get("result", {}).get("rows", []):
        if "skipped" in r:
            print(f"  recipe pass {r['pass']} skipped: {r['skipped']}")
        for cmd in ("pretrain", "finetune") if "skipped" not in r else ():
            c = r.get(cmd, {})
            print(f"  recipe pass {r['pass']} {cmd:8s} wall {c.get('wall_s', 0):6.1f} s  "
                  f"{c.get('images_per_s_median_after_first', 0):8,.0f} img/s  rc {c.get('rc')}")
    for name, s in summary.items():
        if isinstance(s, dict) and ("error" in s or "skipped" in s):
            print(f"  {name}: {s.get('error') or s.get('skipped')}")


if __name__ == "__main__":
    main()
