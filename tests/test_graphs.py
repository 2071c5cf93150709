"""CUDA graphs (engine/accel.py): the graphed step against the eager one.

On the CPU a stand-in capture keeps the step body and "replays" it by running it again on the
static buffers and device scalars. That checks the bookkeeping a real graph depends on: every
number that changes per step (learning rate, EMA rate) reaches the body through a tensor
written before the replay, the batch through the static buffers, the warm-up steps run
eagerly, and a batch of another shape runs eagerly without breaking the replays after it.
On a CUDA machine the same comparison runs with real graphs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from sstl.engine import accel
from sstl.engine.config import ConfigError, Runtime, check, resolve
from sstl.engine.loop import step_body, stepper, train_step
from sstl.engine.methods import build
from sstl.engine.pretrain import build_method, build_trainer

from .configs import pretrain_cfg

STEPS = 8


def _trainer(name: str, device: str, lr_schedule: bool = True):
    cfg = check(pretrain_cfg(name, precision="fp32", device=device))
    res = resolve(cfg.runtime, cfg.batch_size)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = build(name, net, 16, cfg.settings).to(res.device)
    t = build_trainer(cfg, dataclasses.replace(res, compile=False), method, total_steps=STEPS)
    if lr_schedule:  # pretraining's lr is constant; make it move so a baked value would show
        t = dataclasses.replace(t, lr_at=lambda step: 0.05 * (STEPS - step) / STEPS)
    return method, t


def _batches(device: str, sizes=(8,) * 5 + (5,) + (8,) * (STEPS - 6)):  # short after capture
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(n, 3, 16, 16, generator=g).to(device) for _ in range(2))
            for n in sizes]


def _run(step, batches) -> list[torch.Tensor]:
    return [step(b, i).clone() for i, b in enumerate(batches)]


@pytest.mark.parametrize("name, sizes", [
    ("cross", None), ("byol", None), ("simclr", None),
    # the short batch arrives when the capture is due: capture waits for the next full one
    ("cross", (8, 8, 8, 5, 8, 8, 8, 8)),
    # a resume that starts on an epoch's short last batch
    ("byol", (5, 8, 8, 8, 8, 8, 8, 8))])
def test_replayed_step_equals_the_eager_step_cpu(name, sizes):
    eager_m, eager = _trainer(name, "cpu")
    graph_m, graphed = _trainer(name, "cpu")
    captures = []

    def capture(fn):  # the stand-in: record once, run the body at every replay
        captures.append(fn)
        return fn

    step = accel.GraphedStep(graphed, train_step, step_body, capture=capture)
    batches = _batches("cpu", sizes) if sizes else _batches("cpu")
    expect = _run(lambda b, i: train_step(eager, b, i), batches)
    got = _run(step, batches)
    assert len(captures) == 1 and step.calls == STEPS
    assert step.static[0].shape[0] == 8  # captured on a full batch; the short one ran eagerly
    for i, (a, b) in enumerate(zip(expect, got)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    for (key, a), b in zip(eager_m.state_dict().items(), graph_m.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    # The checkpoint holds a plain float lr even though the replays read a device tensor.
    lrs = [g["lr"] for g in graphed.state()["opt"]["param_groups"]]
    assert all(type(x) is float for x in lrs) and lrs[0] == pytest.approx(eager.lr_at(STEPS - 1))


def test_the_comparison_would_catch_values_baked_in_at_capture():
    """The oracle has teeth: lr and tau frozen at their capture-time values (what a graph
    that took them as Python numbers would replay) end far outside the tolerance above."""
    sched_m, sched = _trainer("byol", "cpu")
    baked_m, baked = _trainer("byol", "cpu")
    at = accel.WARMUP  # the step at which the graph is captured
    baked = dataclasses.replace(baked, lr_at=lambda s, f=baked.lr_at: f(min(s, at)),
                                tau_at=lambda s, f=baked.tau_at: f(min(s, at)))
    assert sched.tau_at(STEPS - 1) != sched.tau_at(at)  # BYOL's tau moves over the run
    batches = _batches("cpu")
    _run(lambda b, i: train_step(sched, b, i), batches)
    _run(lambda b, i: train_step(baked, b, i), batches)
    diff = max((a - b).abs().max().item() for a, b in zip(sched_m.state_dict().values(),
                                                          baked_m.state_dict().values())
               if a.is_floating_point())
    assert diff > 1e-3, diff


def test_where_graphs_are_used():
    with pytest.raises(ConfigError, match="cuda-graphs needs a CUDA device"):
        resolve(Runtime(device="cpu", cuda_graphs=True), 32)
    assert not resolve(Runtime(device="cpu"), 32).graphs
    for name in ("cross", "byol", "simsiam", "simclr", "pirl-jigsaw", "pirl-rotation"):
        cfg = check(pretrain_cfg(name, batch_size=4))
        res = dataclasses.replace(resolve(cfg.runtime, cfg.batch_size), graphs=True)
        m = build_method(cfg, res)
        m.attach(16, 0)
        t = build_trainer(cfg, res, m, total_steps=2)
        assert t.graphs == (not name.startswith("pirl")), name  # PIRL keeps host state
    assert not isinstance(stepper(dataclasses.replace(t, graphs=False)), accel.GraphedStep)


def test_compile_cache_goes_to_a_persistent_folder(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # torch writes its own /tmp default into the variable when its compiler is imported:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert accel.compile_cache_dir() == tmp_path / "sstl" / "torch-compile"
    assert (tmp_path / "sstl" / "torch-compile").is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert accel.compile_cache_dir() == tmp_path / "sstl" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert accel.compile_cache_dir() == tmp_path / "mine"  # the user's choice wins


@pytest.fixture
def deterministic_cuda(monkeypatch):
    """cuDNN's default algorithms accumulate with atomics: two eager runs of SimCLR or BYOL
    already differ by 1e-4 to 1e-3 after 8 steps (measured on an H200), more than the
    comparison allows. Deterministic algorithms make eager a fixed reference."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["cross", "byol", "simsiam", "simclr"])
def test_cuda_graph_step_equals_the_eager_step(name, deterministic_cuda):
    eager_m, eager = _trainer(name, "cuda")
    graph_m, graphed = _trainer(name, "cuda")
    graphed = dataclasses.replace(graphed, graphs=True)
    step = stepper(graphed)
    assert isinstance(step, accel.GraphedStep)
    batches = _batches("cuda")
    expect = _run(lambda b, i: train_step(eager, b, i), batches)
    got = _run(step, batches)
    torch.cuda.synchronize()
    assert step.replay is not None
    for i, (a, b) in enumerate(zip(expect, got)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"step {i}")
    for (key, a), b in zip(eager_m.state_dict().items(), graph_m.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)
