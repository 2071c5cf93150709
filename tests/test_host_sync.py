"""No host syncs in the hot loop: a steady-state step, data path included, asks the host
nothing.

On a GPU a host sync makes the CPU wait until every queued kernel has run, so the next step's
launches stop overlapping the current step. The ops that cause one are visible on the CPU
too, as dispatched aten ops: a scalar read (`_local_scalar_dense`: .item(), float(), bool()),
a tensor made from host data (`lift_fresh`: torch.tensor(list, device=cuda) copies and then
synchronises), and data-dependent shapes (nonzero, masked_select, boolean indexing). This test
records every op of one step after warm-up and fails on any of them, naming where it came from.
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sstl.benchmarks.methods import build_step, demo_images
from sstl.engine.methods import METHODS

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default",
            "aten.nonzero.default", "aten.masked_select.default", "aten.is_nonzero.default"}


class HostSyncs(TorchDispatchMode):
    """Records (op, caller in sstl) for every op that needs the host on a GPU."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS or (name.startswith("aten.index") and _bool_index(args)):
            frames = [f for f in traceback.extract_stack() if "/tests/" not in f.filename
                      and ("sstl" in f.filename or "/engine/" in f.filename)]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.found.append((name, where))
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    return any(isinstance(a, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a) for a in args)


def test_the_detector_sees_each_kind_of_sync():
    """The oracle's own check: each sync it is meant to catch is caught."""
    x = torch.randn(4, 3)
    for sync in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x[x > 0],
                 lambda: x.nonzero(), lambda: torch.tensor([1.0, 2.0])):
        with HostSyncs() as rec:
            sync()
        assert rec.found, sync


@pytest.mark.parametrize("method", METHODS)
def test_pretraining_step_has_no_host_sync(method):
    images = demo_images(8)
    _, _, one = build_step(method, images, "cpu", "resnet18", 8, 32)
    one(), one()  # warm-up: first-use set-up may read the host once
    with HostSyncs() as rec:
        one()
    assert rec.found == [], f"{method}: host syncs in a steady-state step: {rec.found}"


def test_finetuning_step_has_no_host_sync():
    from sstl.engine.config import DataConfig, FinetuneAugment, FinetuneConfig, Runtime, check, resolve
    from sstl.engine.data.dataset import load_dataset
    from sstl.engine.data.loader import LabelledSource
    from sstl.engine.finetune import build_trainer
    from sstl.engine.loop import stepper

    cfg = check(FinetuneConfig(data=DataConfig(), arch="resnet18", init="random", batch_size=8,
                               augment=FinetuneAugment(size=32), runtime=Runtime(device="cpu")))
    res = resolve(cfg.runtime, cfg.batch_size)
    ds = load_dataset(cfg.data, need_labels=True, log=lambda m: None)
    src = LabelledSource(ds.images, ds.targets, 8, 32, res.device, cfg.augment.train)
    t = build_trainer(cfg, res, len(ds.class_names), None, total_steps=100)
    one, batches = stepper(t), src.epoch(0)
    one(next(batches), 0), one(next(batches), 1)
    with HostSyncs() as rec:
        one(next(batches), 2)
    assert rec.found == [], f"host syncs in a steady-state fine-tuning step: {rec.found}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own sync detector needs a GPU")
@pytest.mark.parametrize("method", ["cross", "simclr"])
def test_no_synchronising_cuda_call_in_a_graphed_step(method):
    """The same property by CUDA's own account: torch raises on any synchronising call."""
    _, _, one = build_step(method, demo_images(32), "cuda", "resnet18", 32, 64)
    for _ in range(6):  # eager warm-up, capture, replays
        one()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one(), one()
    finally:
        torch.cuda.set_sync_debug_mode("default")
