"""What makes the step fast on a GPU: torch.compile with a persistent cache, and the whole
training step replayed as one CUDA graph.

Why graphs: on an H200 the resnet50 SSL step is launch-bound. A profile showed 27 ms of
kernels inside 43-60 ms of wall time and ~1,500 launches per step; the GPU idled while Python
queued the next kernel. A CUDA graph records every launch of one step (forward of both
networks, backward, SGD, EMA) once and replays them with one call.

How (PyTorch's "whole-network capture" recipe):
  * the batch lives in static buffers; each step copies the data path's tensors into them
    (a device-to-device copy) and replays the graph, which reads the same addresses;
  * every number that changes between steps lives in a 0-dim device tensor written before
    the replay: the learning rate (SGD takes a tensor lr) and the EMA rate tau (the EMA kernel
    reads it from memory). A Python float would be baked into the graph at capture;
  * the first WARMUP steps run eagerly on a side stream: they compile, autotune cuDNN and
    allocate SGD's momentum buffers, none of which may happen during capture. They are real
    steps of the run, so a graphed run and an eager one follow the same schedule;
  * a batch of another shape (the last, short batch of a fine-tuning epoch) runs eagerly:
    parameters, momentum and EMA buffers are updated in place either way, so the graph stays
    valid around it.
Used only on CUDA, in one process, for methods whose step has no host-side randomness or
state (Method.graph_safe). `--no-cuda-graphs` turns it off.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

WARMUP = 3  # eager steps before capture (the PyTorch recipe uses 3; DDP would need 11)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with Inductor's caches kept across runs (see compile_cache_dir)."""
    compile_cache_dir()
    return torch.compile(module)


def compile_cache_dir() -> Path:
    """Where compiled kernels and graphs are cached: $TORCHINDUCTOR_CACHE_DIR if the user set
    it, else ~/.cache/sstl/torch-compile (torch's default is /tmp, which containers and
    reboots clear, so every run would pay the whole compilation again)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing torch's compiler already writes its /tmp default into the variable, so that
    # value counts as unset; any other value is the user's choice.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "sstl" / "torch-compile")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_counters() -> dict:
    """Inductor's cache hits and misses so far in this process (fit records each run's share)."""
    from torch._dynamo.utils import counters

    ind = counters.get("inductor", {})
    return {k: int(ind.get(k, 0)) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


def cuda_capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Record fn's launches as a CUDA graph (nothing runs yet); returns its replay, which
    returns the static output that every replay rewrites."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the data path's threads (DALI's prefetch) keep working during capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


class GraphedStep:
    """`train_step(t, batch, step)` replayed from a CUDA graph after WARMUP eager steps.

    `capture` turns the step body into a replay function (cuda_capture on a GPU). It is a
    parameter so that the bookkeeping (static buffers, device scalars, warm-up, shape
    fallback) is tested on the CPU with a stand-in whose "replay" runs the body again.
    """

    def __init__(self, t, step_fn, body_fn, capture=cuda_capture, stream=None):
        self.t, self.step_fn, self.body_fn, self.capture = t, step_fn, body_fn, capture
        self.stream = stream  # side stream of the warm-up steps (CUDA); None: current
        self.replay, self.calls, self.seconds, self.largest = None, 0, 0.0, 0
        self.static, self.lr, self.tau = None, None, None

    def __call__(self, batch: tuple, step: int) -> torch.Tensor:
        self.calls += 1
        self.largest = max(self.largest, batch[0].shape[0])
        # Warm up, and capture only a full batch: a graph of an epoch's short last batch would
        # leave every full batch after it to run eagerly.
        if self.replay is None and (self.calls <= WARMUP or batch[0].shape[0] < self.largest):
            return self._on_side_stream(lambda: self.step_fn(self.t, batch, step))
        if self.replay is None:
            self._capture(batch)
        if not self._fits(batch):  # another shape: this one step runs eagerly
            return self.step_fn(self.t, batch, step)
        for s, b in zip(self.static, batch):
            s.copy_(b, non_blocking=True)
        self.lr.fill_(self.t.lr_at(step))
        self.tau.fill_(self.t.tau_at(step))
        return self.replay()

    def _fits(self, batch: tuple) -> bool:
        return len(batch) == len(self.static) and all(
            b.shape == s.shape and b.dtype == s.dtype and b.stride() == s.stride()
            for b, s in zip(batch, self.static))

    def _on_side_stream(self, fn):
        if self.stream is None:
            return fn()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _capture(self, batch: tuple) -> None:
        t0 = time.perf_counter()
        device = batch[0].device
        self.static = tuple(b.clone() for b in batch)  # clone keeps shape, dtype and strides
        # The learning rate becomes one device tensor shared by every parameter group.
        self.lr = torch.zeros((), device=device)
        for group in self.t.opt.param_groups:
            group["lr"] = self.lr
        self.tau = torch.ones((), device=device, dtype=torch.float64)  # 1 - tau stays exact
        if self.t.ema is not None:  # its device-tau kernel compiled (and loaded) before the
            self.t.ema.update(self.tau)  # capture, not inside it; tau 1 leaves the target be
        self.t.opt.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        self.replay = self.capture(lambda: self.body_fn(self.t, self.static, self.tau))
        self.seconds = time.perf_counter() - t0
