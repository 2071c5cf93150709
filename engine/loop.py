"""The one training loop, shared by every command: step, metrics, checkpoints, resume, signals.

A command builds a `Trainer` (what to run) and a source (batches on the device), opens a
`Run`, and calls `fit`. Everything else lives here once:
  * train_step: forward (the method's or the classifier's), backward, SGD, EMA. No host sync.
  * the log-every host read, which is also where a non-finite loss stops the run;
  * checkpoints every --checkpoint-minutes (and every --checkpoint-every steps when set), at the
    end, and on SIGINT/SIGTERM: the step in flight finishes, a checkpoint is written, exit 130;
  * under torchrun (engine/dist.py) the ranks agree, by one all-reduce at each log-every and
    --checkpoint-every step, on the global mean loss and on stopping and checkpointing: a
    signal or a time-based checkpoint takes effect at the next such step on every rank. The
    checkpoint holds the global partial sums, so every rank resumes from the same one;
  * exact resume: the checkpoint holds the model, optimizer, RNG and the epoch's partial sums,
    and data order/augmentation are functions of (seed, epoch, step), so a resumed run repeats
    the uninterrupted one bit for bit on the CPU.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import kernels
from . import accel, dist
from .keys import resume_keys
from .record import MetricsCSV
from .runs import CHECKPOINT_FORMAT, Reporter, Run, log


class EMA:
    """target <- tau * target + (1 - tau) * online over one flat buffer each: one launch."""

    def __init__(self, online: list[torch.Tensor], target: list[torch.Tensor]):
        self.online, self.target = kernels.FlatParams(online), kernels.FlatParams(target)
        if not self.online.same_layout(self.target):  # the EMA pairs elements by position
            raise ValueError("EMA: online and target tensors differ in shape or memory layout; "
                             "convert both networks (channels_last) before building the EMA")
        self.check()

    def update(self, tau) -> None:  # a float, or a 0-dim device tensor (CUDA graphs)
        kernels.ema_(self.target, self.online, tau)

    def check(self) -> None:  # a re-allocated tensor would silently leave the flat buffer
        self.online.check()
        self.target.check()


@dataclass
class Trainer:
    """What one step needs besides the batch (built once per run)."""

    model: torch.nn.Module  # everything checkpointed (a method, or a classifier)
    forward: Callable  # (*batch) -> (loss, {stat: 0-dim tensor}); compiled or not
    opt: torch.optim.Optimizer
    autocast: Callable  # () -> context manager
    lr_at: Callable[[int], float]  # learning rate of a global step
    stats: tuple[str, ...] = ()  # names of the stats forward returns, in order
    ema: EMA | None = None  # the target network's EMA, for methods that keep one
    tau_at: Callable[[int], float] = lambda step: 1.0  # EMA rate of a global step
    graphs: bool = False  # replay the step as a CUDA graph (accel.py)
    compiled: bool = False  # forward is torch.compiled (timing.json records cache hits)
    dtype: str = "float32"  # the step's compute dtype (Resolved.dtype), kept in checkpoints

    def state(self) -> dict:
        opt = self.opt.state_dict()
        for group in opt["param_groups"]:  # a graphed run's lr is a device tensor
            group["lr"] = float(group["lr"])
        return {"model": self.model.state_dict(), "opt": opt, "torch_rng": torch.get_rng_state()}

    def load(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])  # copies in place: flat EMA views stay valid
        self.opt.load_state_dict(ck["opt"])
        match_param_layouts(self.opt)
        torch.set_rng_state(ck["torch_rng"])
        if self.ema is not None:
            self.ema.check()


def match_param_layouts(opt: torch.optim.Optimizer) -> None:
    """Give every loaded optimizer buffer its parameter's strides. CUDA's fused SGD refuses a
    momentum buffer laid out otherwise than its channels_last parameter, and checkpoints
    written before their host copies kept strides hold NCHW buffers."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, buf in opt.state.get(p, {}).items():
                if torch.is_tensor(buf) and buf.shape == p.shape and buf.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=buf.dtype).copy_(buf)


def sgd(params, lr: float, momentum: float, weight_decay: float, device: str):
    on_gpu = str(device).startswith("cuda")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           **({"fused": True} if on_gpu else {"foreach": True}))


def train_step(t: Trainer, batch: tuple, step: int) -> torch.Tensor:
    """One optimizer step; returns [loss, *stats] on the device (no host sync)."""
    set_lr(t.opt, t.lr_at(step))
    return step_body(t, batch, t.tau_at(step))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # a CUDA graph reads it from the device
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def step_body(t: Trainer, batch: tuple, tau) -> torch.Tensor:
    """Forward, backward, SGD, EMA: the part of a step a CUDA graph captures (accel.py)."""
    with t.autocast():
        loss, stats = t.forward(*batch)
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()
    if t.ema is not None:
        t.ema.update(tau)
    return torch.stack([loss.detach().float(), *(stats[k].detach().float() for k in t.stats)])


def stepper(t: Trainer) -> Callable[[tuple, int], torch.Tensor]:
    """The step `fit` calls: graphed on CUDA where the trainer allows it, else train_step."""
    if not t.graphs:
        return lambda batch, step: train_step(t, batch, step)
    return accel.GraphedStep(t, train_step, step_body, stream=torch.cuda.Stream())


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits 130."""

    def __init__(self):
        self.requested, self._old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True
        log("stopping: finishing this step and writing a checkpoint (Ctrl-C again to abort: "
            "what was trained since the last checkpoint is then lost)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Plan:
    """How a command wants its loop run."""

    epochs: int
    key: str  # resume key, written into checkpoints: one continues only the run it came from
    # The runtime block's intervals (Plan.of copies them; their defaults live in Runtime).
    log_every: int  # steps between loss reads
    checkpoint_every: int  # steps; 0 = by time only
    checkpoint_minutes: float
    desc: str  # the progress line's label
    live: bool  # progress output (rank 0 only under DDP)
    # Identity of what the run learns from (its images, its encoder file). A checkpoint made
    # from other inputs is refused: resuming would mix two data sets, and the sidecars written
    # at the end would vouch for the new data (the leak check trusts them).
    inputs: str
    images_per_step: int = 0  # for img/s; 0 = the batch's first dimension
    on_epoch_end: Callable[[int], dict] | None = None  # extra metrics (e.g. test evaluation)

    @classmethod
    def of(cls, cfg, **kw) -> "Plan":
        """A training command's plan: its epochs, resume key and runtime block's intervals."""
        rt = cfg.runtime
        return cls(epochs=cfg.epochs, key=resume_keys(cfg)[0], log_every=rt.log_every,
                   checkpoint_every=rt.checkpoint_every,
                   checkpoint_minutes=rt.checkpoint_minutes, **kw)


def fit(run: Run, t: Trainer, source, plan: Plan) -> list[dict]:
    """Train to `plan.epochs` from the checkpoint command.begin found (run.found), if any;
    returns metrics.csv rows."""
    steps = source.steps_per_epoch
    epoch, start, partial = _start(run, t, plan)
    metrics = MetricsCSV(run.path / "metrics.csv", run.is_main)
    metrics.truncate(epoch)
    rep = Reporter(plan.epochs * steps, plan.desc, epoch * steps + start, live=plan.live)
    saves = Checkpoints(run, t, plan)
    t_train = time.perf_counter()
    world, stopping, step_fn, first = dist.world(), False, stepper(t), True
    cache_before = accel.compile_counters()  # process-wide: `reproduce` runs many fits
    try:
        with StopRequest() as stop:
            for epoch in range(epoch, plan.epochs):
                sums = torch.zeros(1 + len(t.stats), dtype=torch.float64)
                seen, seconds = 0, 0.0
                if partial is not None:
                    sums, seen, seconds = partial["sums"], partial["seen"], partial["seconds"]
                sums = sums.to(source.device)
                t0, i, stopping = time.perf_counter() - seconds, start - 1, False
                for i, batch in enumerate(source.epoch(epoch, start), start):
                    sums += step_fn(batch, epoch * steps + i)
                    if first:  # the first step holds compilation: timed once, with one sync
                        first = _time_first_step(run, source.device, t_train)
                    seen += plan.images_per_step or batch[0].shape[0] * world
                    at_log = (i + 1) % plan.log_every == 0 or i + 1 == steps
                    by_steps = saves.every(epoch * steps + i + 1)
                    if world > 1 and not (at_log or by_steps):
                        continue  # ranks agree on stopping and saving at these steps only
                    # One all-reduce under torchrun: the global running sums, and whether any
                    # rank was signalled or is due a checkpoint, so all act at the same step.
                    glob, stopping, saving = _agree(sums, stop.requested,
                                                    saves.due(epoch * steps + i + 1))
                    if at_log:
                        _report(run, rep, plan, t.stats, glob, epoch, steps, i + 1,
                                seen / (time.perf_counter() - t0))
                    if i + 1 < steps and (stopping or saving):
                        if not _finite(t.model, glob):  # never checkpoint a diverged state
                            _diverged(run, float(glob[0] / (i + 1)), epoch, i + 1)
                        saves.save(epoch, i + 1, {"sums": glob, "seen": seen,
                                                  "seconds": time.perf_counter() - t0})
                    if stopping:
                        break
                if stopping and i + 1 < steps:
                    break
                row = _epoch_row(run, t, epoch, sums, steps, seen, time.perf_counter() - t0)
                if plan.on_epoch_end is not None:
                    row.update(plan.on_epoch_end(epoch))
                stopping = dist.any_rank(stopping or stop.requested, source.device)
                metrics.append(row)
                start, partial = 0, None
                if epoch + 1 == plan.epochs or stopping or saves.due((epoch + 1) * steps):
                    saves.save(epoch + 1, 0, None)  # rank 0 writes; the others need not agree
                if stopping:
                    break
            run.flush()
            if stopping:
                rep.close()
                log(f"interrupted: checkpoint written to {run.checkpoint}; run {run.again} "
                    "to continue")
                raise SystemExit(130)
    finally:
        rep.close()
        _record_time(run, t, step_fn, time.perf_counter() - t_train, cache_before)
    return metrics.rows()


class Checkpoints:
    """When fit writes a checkpoint (every --checkpoint-minutes, and every --checkpoint-every
    steps when set), and what one holds."""

    def __init__(self, run: Run, t: Trainer, plan: Plan):
        self.run, self.t, self.plan, self.last = run, t, plan, time.monotonic()

    def every(self, global_step: int) -> bool:  # --checkpoint-every counts steps across epochs
        n = self.plan.checkpoint_every
        return bool(n) and global_step % n == 0

    def due(self, global_step: int) -> bool:
        return (self.every(global_step)
                or time.monotonic() - self.last > 60 * self.plan.checkpoint_minutes)

    def save(self, epoch: int, step: int, partial: dict | None) -> None:
        """The state after `step` steps of `epoch` (partial: the epoch's running sums)."""
        self.run.save({"format": CHECKPOINT_FORMAT, "resume_key": self.plan.key,
                       "inputs": self.plan.inputs, "epoch": epoch, "step": step,
                       "partial": partial, "world": dist.world(), "dtype": self.t.dtype,
                       **self.t.state()})
        self.last = time.monotonic()


def _report(run: Run, rep: Reporter, plan: Plan, names, sums: torch.Tensor, epoch: int,
            steps: int, done: int, rate: float) -> None:
    """The log-every read: the epoch's mean loss and stats over its first `done` steps on the
    progress line; a loss that stopped being a number ends the run."""
    means = (sums / done).tolist()  # the only per-step host sync
    if not math.isfinite(means[0]):
        _diverged(run, means[0], epoch, done)
    stats = " ".join(f"{k} {v:.3f}" for k, v in zip(names, means[1:]))
    rep.update(epoch * steps + done,
               f"epoch {epoch + 1}/{plan.epochs} loss {means[0]:.4f} {stats} {rate:,.0f} img/s")


def _start(run: Run, t: Trainer, plan: Plan) -> tuple[int, int, dict | None]:
    """(epoch, step, partial epoch sums) to start from: the checkpoint command.begin found
    (run.found), loaded into `t`, or the beginning."""
    ck, run.found = run.found, None  # loaded once; the memory goes with it
    run.training = True
    if ck is None:
        return 0, 0, None
    t.load(ck)
    epoch, start = ck["epoch"], ck["step"]
    _check_world(ck, start)
    _check_dtype(ck, t.dtype)
    log(f"resuming {run.path} at epoch {epoch + 1}, step {start}" if epoch < plan.epochs
        else f"{run.path} has finished its {plan.epochs} epoch{'s' * (plan.epochs != 1)}: "
             "nothing to train, its outputs are written again from the final checkpoint")
    return epoch, start, ck.get("partial")


def _epoch_row(run: Run, t: Trainer, epoch: int, sums: torch.Tensor, steps: int, seen: int,
               seconds: float) -> dict:
    """metrics.csv's row of a finished epoch (means over its steps and ranks); a loss or a
    weight that stopped being a number ends the run instead."""
    means = (dist.all_reduce_mean(sums.clone()) / max(steps, 1)).tolist()
    if not (all(map(math.isfinite, means)) and _finite(t.model)):
        _diverged(run, means[0], epoch, steps)
    return {"epoch": epoch, "loss": means[0], **{k: v for k, v in zip(t.stats, means[1:])},
            # float(): a graphed run's lr is a device tensor (accel.py)
            "lr": float(t.opt.param_groups[0]["lr"]), "images_per_s": seen / seconds,
            "seconds": seconds}


def _record_time(run: Run, t: Trainer, step_fn, seconds: float, cache_before: dict) -> None:
    """timing.json: training time, the CUDA graph's capture, this run's compile-cache hits
    and misses (the counters are process-wide: `reproduce` runs many fits)."""
    run.add_time("train", seconds)
    if isinstance(step_fn, accel.GraphedStep):
        run.add_time("graph_capture", step_fn.seconds)
    if t.compiled:
        run.timing.update({k: v - cache_before[k] for k, v in accel.compile_counters().items()})
    run.write_timing()


def _check_world(ck: dict, step: int) -> None:
    """A checkpoint written by another number of processes: the weights carry over, but the
    rest of an interrupted epoch is dealt to ranks by the new count (loader.py), so some of
    its images may come twice and others not at all. Said, not refused: nothing is lost."""
    then, now = ck.get("world"), dist.world()
    if then is not None and then != now:
        log(f"warning: the checkpoint was written by {then} process{'es' * (then != 1)}, this "
            f"run has {now}" + (f"; the rest of its interrupted epoch deals images to {now}, so "
                                "a few may repeat or be skipped in this epoch, and the run will "
                                "not match an uninterrupted one exactly" if step else ""))


def _check_dtype(ck: dict, now: str) -> None:
    """A checkpoint trained in another precision (--precision auto is bf16 on a GPU, fp32 on
    a CPU, so moving a run between them changes it): said, since the rest of the run then
    differs from an uninterrupted one; not refused, since the weights carry over."""
    then = ck.get("dtype")
    if then is not None and then != now:
        log(f"warning: the checkpoint was trained in {then}, this run computes in {now} (see "
            "--precision and --device); the rest of the run will not match an uninterrupted one")


def _finite(model: torch.nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether every weight and statistic is a number (one host sync, at checkpoints and epoch
    ends only). The loss of a step is computed before its update, so the weights can break
    first."""
    state = [v for v in model.state_dict().values() if v.is_floating_point()] + list(tensors)
    return bool(torch.stack([v.isfinite().all() for v in state]).all())


def _diverged(run: Run, value: float, epoch: int, step: int):
    """The loss (or a statistic) stopped being a number: stop, and say what is left to resume."""
    run.flush()  # a checkpoint being written counts once it is on disk
    kept = (f"the last checkpoint before it is in {run.path}" if run.checkpoint.exists()
            else "no checkpoint had been written yet")
    raise SystemExit(f"training diverged (loss {value}) by epoch {epoch + 1}, step {step}; "
                     f"{kept}. Rerun with a lower --lr (a new run: with --name, give a new one "
                     "or add --no-resume)")


def _time_first_step(run: Run, device, t0: float) -> bool:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    run.add_time("first_step", time.perf_counter() - t0)
    return False


def _agree(sums: torch.Tensor, stop: bool, due: bool) -> tuple[torch.Tensor, bool, bool]:
    """(mean over ranks of the running sums, any rank stopping, any rank due a checkpoint)."""
    if dist.world() == 1:
        return sums, stop, due
    packed = dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([float(stop), float(due)])]))
    n = len(sums)
    flags = packed[n:].tolist()
    return packed[:n] / dist.world(), flags[0] > 0, flags[1] > 0
