"""torchrun data parallelism on the CPU (gloo): two processes with half the batch each train
the same model as one process with the whole batch, resume exactly, and refuse a batch that
does not divide.

Oracle of equality: the update. Both runs start from the same seeded weights; the two-process
run averages gradients over ranks (DDP), normalises BN over the global batch and draws each
image's augmentation as one process would, so it differs from the one-process run only by
float32 rounding: the one-process run's BN statistics are float32 sums, the two-process run's
are float64 all-reduced sums. A few steps amplify that through BN channels of near-zero
variance (random init, 32-pixel views). The one-process run is pinned to two threads
(_on_two_threads: its rounding then follows the ranks' halves); over the whole state (online,
target, BN buffers) the difference stays below 1e-2 of the update's norm (measured 2e-5 to
5e-5; 2e-3 to 7e-3 on one thread), while per-rank BN instead of global BN gives 0.13. The
epoch's loss (metrics.csv) agrees to 2e-3 relative (measured 5e-7; 5e-3 on one thread;
per-rank BN: 1.6e-2).
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from sstl.cli.main import app
from sstl.engine.config import check, resolve
from sstl.engine.pretrain import build_method, pretrain

from .configs import SMALL_HEADS, pretrain_cfg

pytestmark = pytest.mark.timeout(600)  # each test: well under a minute on 2 idle cores
SETTINGS = dict(batch_size=32, test_fraction=0.75, lr=0.003, cache_size=64, log_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(method: str, out, name: str, test_fraction: float = 0.75) -> list[str]:
    heads = [f"--method-option={k}={v}" for k, v in SMALL_HEADS[method].items()]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), "-m", "sstl.cli.main", "pretrain",
            "--method", method, "--arch", "resnet18", "--init", "random", "--device", "cpu",
            "--no-compile", "--epochs", "1", "--batch-size", "32",
            "--test-fraction", str(test_fraction), "--lr", "0.003", "--view-size", "32",
            "--cache-size", "64",
            "--log-every", "1", "--checkpoint-every", "1", "--out", str(out), "--name", name,
            *heads]


ENV = {**os.environ, "SSTL_PLAIN_LOG": "1", "OMP_NUM_THREADS": "1"}


def _start(method, out, name, test_fraction=0.75) -> subprocess.Popen:
    """A 2-process run in the background (the test overlaps it with other work)."""
    return subprocess.Popen(_command(method, out, name, test_fraction), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, run):
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 0, err[-3000:]
    return run


def _model(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _losses(run, column="loss"):
    with open(run / "metrics.csv") as fh:
        return [float(r[column]) for r in csv.DictReader(fh)]


def _on_two_threads(fn, *args):
    """The one-process run on two threads, whatever the machine: oneDNN then sums each BN
    statistic in two halves, as the two ranks do, and both runs agree to 5e-7 (loss) and
    2e-5 to 5e-5 of the update (measured). On one thread its float32 sum runs through the
    whole batch and drifts: 5e-3 (loss) and 2e-3 to 7e-3 of the update (measured, Cross and
    BYOL), an environment's accident that the bounds below need not absorb."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["cross", "byol", "simclr"])
def test_two_processes_with_half_batches_equal_one_process(method, tmp_path):
    p = _start(method, tmp_path, "two")  # 2 steps of 2 x 16 images
    cfg = pretrain_cfg(method, out=str(tmp_path), name="one", **SETTINGS)  # 2 steps of 32
    one = _on_two_threads(pretrain, cfg)
    two = _finish(p, tmp_path / "two")
    init = build_method(check(cfg), resolve(cfg.runtime, cfg.batch_size)).state_dict()
    a, b = _model(two), _model(one)
    assert a.keys() == b.keys()
    keys = [k for k in a if a[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten().double() for k in keys]).norm()
    update = torch.cat([(b[k] - init[k]).flatten().double() for k in keys]).norm()
    assert diff < 1e-2 * update, (diff / update).item()
    if method != "simclr":  # the target's BN buffers are compared too
        assert any("target" in k and "running_var" in k for k in keys)
    torch.testing.assert_close(_losses(two), _losses(one), rtol=2e-3, atol=0)
    # The collapse monitor is the global batch's spread, not a mean of the ranks' (it was
    # 1.7% off with two processes: a mean of per-rank stds is not the std of the whole).
    torch.testing.assert_close(_losses(two, "spread"), _losses(one, "spread"), rtol=2e-3, atol=0)
    if method == "simclr":  # the negatives are the global batch's (gather_views), not a rank's
        torch.testing.assert_close(_losses(two, "pos_rank1"), _losses(one, "pos_rank1"),
                                   rtol=2e-3, atol=0)


def test_finetuning_on_two_processes_equals_one_process(tmp_path):
    """Fine-tuning's augmentation too is drawn for the global batch, each rank keeping its
    rows (it used to be seeded per rank: 0.37 of the update apart). Same oracle as above."""
    from sstl.engine.finetune import build_trainer as finetune_trainer, finetune

    from .configs import finetune_cfg

    args = ["--arch", "resnet18", "--init", "random", "--device", "cpu", "--no-compile",
            "--epochs", "1", "--batch-size", "32", "--image-size", "32", "--cache-size", "64",
            "--test-fraction", "0.75", "--lr", "0.003", "--log-every", "1"]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "sstl.cli.main", "finetune",
                          *args, "--out", str(tmp_path), "--name", "two"],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cfg = finetune_cfg(image_size=32, out=str(tmp_path), name="one", batch_size=32,
                       cache_size=64, test_fraction=0.75, lr=0.003, log_every=1)
    one = finetune(cfg)
    two = _finish(p, tmp_path / "two")
    c = check(cfg)
    init = finetune_trainer(c, resolve(c.runtime, c.batch_size), 4, None, 1).model.state_dict()
    a, b = _model(two), _model(one)
    keys = [k for k in a if a[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten().double() for k in keys]).norm()
    update = torch.cat([(b[k] - init[k]).flatten().double() for k in keys]).norm()
    assert diff < 1e-2 * update, (diff / update).item()


def test_sigterm_to_torchrun_then_rerun_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = _start("cross", tmp_path, "full", test_fraction=0.5)  # 4 steps
    cmd = _command("cross", tmp_path, "killed", test_fraction=0.5)
    ck = tmp_path / "killed" / "checkpoint.pt"
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ck.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    err = p.communicate(timeout=300)[1]
    assert p.returncode != 0, "the run ended before the signal: nothing was interrupted"
    assert "run the same command again to continue" in err, err[-2000:]
    stopped = torch.load(ck, weights_only=True)
    assert (stopped["epoch"], stopped["step"]) < (1, 0)  # stopped mid-epoch
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    full = _finish(uninterrupted, tmp_path / "full")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    a, b = _model(full), _model(tmp_path / "killed")  # the same ranks, the same sums: bitwise
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(full) == _losses(tmp_path / "killed")


def test_a_batch_that_does_not_divide_over_the_processes_is_one_line(tmp_path, monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["pretrain", "--arch", "resnet18", "--init", "random",
                                 "--device", "cpu", "--no-compile", "--batch-size", "33",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "--batch-size 33 does not divide over the 2 processes" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_reproduce_under_torchrun_runs_every_cell_in_one_process_group(tmp_path):
    """Found by a user: under torchrun each cell joined the process group and left it, and
    the second cell could not join again (its rendezvous was gone) or hung. The grid now
    holds one group, every cell joins it, and rank 0 writes tables of every cell."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "sstl.cli.main", "reproduce",
           "--preset", "quick", "--row", "scratch", "--fraction", "0.1", "--fraction", "0.5",
           "--device", "cpu", "--out", str(tmp_path), "--name", "g"]
    p = subprocess.run(cmd, env={**ENV, "SSTL_CACHE": str(tmp_path / "cache")},
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "g" / "fig3.csv") as fh:
        assert [(r["row"], r["fraction"]) for r in csv.DictReader(fh)] == [
            ("scratch", "0.1"), ("scratch", "0.5")]
    for f in ("0.1", "0.5"):
        assert len(_losses(tmp_path / "g" / f"finetune-scratch-f{f}-s0")) == 5  # its epochs


def test_a_run_rank_0_refuses_ends_every_rank_in_one_line(tmp_path):
    """Found by a user: when rank 0 refused a run (its folder locked by another sstl) and
    left, rank 1 waiting for it printed gloo's 100-line traceback. Each rank now says one
    line: rank 0 why, rank 1 that another process stopped."""
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sstl holds it
        held.write("4242")
        held.flush()
        p = subprocess.run(_command("cross", tmp_path, "busy"), env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert p.returncode != 0
    assert "is in use by another sstl process (pid 4242)" in p.stderr, p.stderr[-2000:]
    assert "rank 1: another process of this run stopped" in p.stderr, p.stderr[-3000:]
    # torchrun's own summary of a failed job stays; no traceback from inside sstl does.
    assert "/engine/" not in p.stderr and "RuntimeError" not in p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("extra,differs", [("--lr 0.1", "lr: 0.003 -> 0.1"),
                                           ("--log-every 4", "log_every: 1 -> 4")])
def test_ranks_started_with_other_settings_are_refused_naming_the_difference(tmp_path, extra,
                                                                            differs):
    """Found by a user: rank 1 given another --lr trained a diverging replica unsaid, and
    another --epochs left rank 0 waiting at the end (as another --log-every did: the ranks
    meet in a collective at those steps). The ranks compare their settings when the run
    begins, and each says how its own differ from rank 0's."""
    import shlex

    base = _command("cross", tmp_path, "mixed")
    cut = base.index("sstl.cli.main")  # torchrun's own arguments end with the "-m" before it
    launcher, program = base[:cut - 1], [sys.executable, "-m", *base[cut:]]
    script = tmp_path / "per-rank.sh"  # what a hand-made launcher with a typo does
    script.write_text(f"#!/bin/sh\nextra=''\n[ \"$RANK\" = 1 ] && extra='{extra}'\n"
                      f"exec {shlex.join(program)} $extra\n")
    script.chmod(0o755)
    cmd = [*launcher, "--no-python", str(script)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "rank 1: the processes of this run were started with other settings; this one's " \
           f"differs from rank 0's ({differs})" in p.stderr, p.stderr[-3000:]
    assert "rank 0: the processes of this run were started with other settings; this one's " \
           "is rank 0's, but rank(s) 1 differ" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "mixed").exists()  # refused before anything was kept


def test_only_a_lost_connection_counts_as_a_peer_gone():
    """A rank's own gloo error (a wrong tensor size) keeps its traceback; only a closed or
    timed-out connection becomes "another process of this run stopped"."""
    from sstl.engine.dist import peer_gone

    assert peer_gone(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                                  "[127.0.0.1]:13468"))
    assert not peer_gone(RuntimeError("ProcessGroupGloo::allgather: invalid tensor size at "
                                      "index 0 (expected (2), got (3))"))
    assert not peer_gone(RuntimeError("CUDA out of memory"))
