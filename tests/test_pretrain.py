"""End to end: `sstl pretrain` learns with every method, writes an encoder that fine-tuning
loads, and resumes exactly (bitwise on the CPU) from a mid-epoch checkpoint."""
from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sstl.cli.main import app
from sstl.engine import loop
from sstl.engine import pretrain as pretrain_mod
from sstl.engine.finetune import finetune
from sstl.engine.methods import METHODS
from sstl.engine.models import backbone

from .configs import SMALL_HEADS, finetune_cfg, pretrain_cfg
from .conftest import CXR_SMALL, needs_shared


def _losses(run):
    with open(run / "metrics.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def _state(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


@needs_shared
@pytest.mark.parametrize("method", list(METHODS))
def test_pretrain_cxr_small_learns_and_encoder_finetunes(method, tmp_path):
    heads = [f"--method-option={k}={v}" for k, v in SMALL_HEADS[method].items()]
    args = ["pretrain", "--data", str(CXR_SMALL), "--method", method, "--arch", "resnet18",
            "--init", "random", "--epochs", "3", "--batch-size", "64", "--view-size", "32",
            "--cache-size", "64", "--out", str(tmp_path), "--name", "e2e", "--device", "cpu",
            "--no-compile", *heads]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "e2e"
    losses = _losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["arch"] == "resnet18" and meta["epoch"] == 3 and meta["method"] == method
    timing = json.loads((run / "timing.json").read_text())  # the phases nest in the total
    assert 0 < timing["first_step"] <= timing["train"], timing
    phases = ("data", "build", "train", "report")  # the build before the run dir is outside
    assert sum(timing[k] for k in phases) <= timing["total"] + timing["build"] + 0.01, timing
    net = backbone("resnet18", init=str(run / "encoder.safetensors"))
    sd = load_file(run / "encoder.safetensors")
    torch.testing.assert_close(net.state_dict()["conv1.weight"], sd["conv1.weight"])
    # The encoder is the final checkpoint's backbone, and fine-tuning starts from it.
    ck = _state(run)
    torch.testing.assert_close(ck["backbone.conv1.weight"], sd["conv1.weight"], rtol=0, atol=0)
    ft = finetune(finetune_cfg(path=CXR_SMALL, encoder=str(run), out=str(tmp_path), name="ft",
                               fraction=0.1, image_size=32, cache_size=64))
    assert (ft / "model.safetensors").exists()


def _cfg(tmp_path, name, method, **kw):
    return pretrain_cfg(method, out=str(tmp_path), name=name, epochs=2, log_every=1,
                        checkpoint_every=2, **kw)


@pytest.mark.parametrize("method", list(METHODS))
def test_mid_epoch_resume_is_bitwise_exact(method, tmp_path, monkeypatch):
    full = pretrain_mod.pretrain(_cfg(tmp_path, "full", method))
    real, calls = loop.train_step, {"n": 0}

    def killed_at_step_9(*a):  # epoch 2, step 3 (6 steps per epoch); last checkpoint: step 2
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # stands for a kill: nothing after the checkpoint survives
        return real(*a)

    monkeypatch.setattr(loop, "train_step", killed_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mod.pretrain(_cfg(tmp_path, "resumed", method))
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert not (tmp_path / "resumed" / "encoder.safetensors").exists()
    monkeypatch.setattr(loop, "train_step", real)
    resumed = pretrain_mod.pretrain(_cfg(tmp_path, "resumed", method))
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(full) == _losses(resumed)  # the epoch's partial sums were checkpointed too


def test_sigint_checkpoints_then_the_same_command_continues(tmp_path, monkeypatch, capsys):
    cfg = pretrain_cfg("cross", out=str(tmp_path), epochs=2)  # no --name: named by its settings
    full = pretrain_mod.pretrain(pretrain_cfg("cross", out=str(tmp_path / "f"), epochs=2))
    real, calls = loop.train_step, {"n": 0}

    def ctrl_c_at_step_4(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends it
        return real(*a)

    monkeypatch.setattr(loop, "train_step", ctrl_c_at_step_4)
    with pytest.raises(SystemExit) as e:
        pretrain_mod.pretrain(cfg)
    assert e.value.code == 130
    said = capsys.readouterr().err
    assert "run the same command again to continue" in said
    (run,) = tmp_path.glob("pretrain-cross-*")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (0, 4)  # the step in flight finished, then the checkpoint
    monkeypatch.setattr(loop, "train_step", real)
    assert pretrain_mod.pretrain(cfg) == run  # the same command found the same run
    a, b = _state(full), _state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_no_resume_run_says_to_drop_the_flag(tmp_path, monkeypatch, capsys):
    """Rerun as it was typed, a --no-resume run would start over and lose what the
    interruption kept: the message says to drop the flag."""
    real = loop.train_step

    def ctrl_c(*a):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a)
    monkeypatch.setattr(loop, "train_step", ctrl_c)
    with pytest.raises(SystemExit) as e:
        pretrain_mod.pretrain(pretrain_cfg("cross", out=str(tmp_path), name="n", epochs=2,
                                           resume=False))
    assert e.value.code == 130
    assert "run the same command again without --no-resume to continue" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    pretrain_mod.pretrain(pretrain_cfg(out=str(tmp_path), name="r"))
    with pytest.raises(SystemExit, match=r"different settings \(lr: 0.03 -> 0.1\); use"):
        pretrain_mod.pretrain(pretrain_cfg(out=str(tmp_path), name="r", lr=0.1))
    # Nested and several: each by its config.json name; what may change (device...) is not one.
    with pytest.raises(SystemExit, match=r"different settings \(augment.size: 32 -> 40; "
                                         r"epochs: 1 -> 2; settings.proj_dim: 32 -> 16\)"):
        pretrain_mod.pretrain(pretrain_cfg(out=str(tmp_path), name="r", epochs=2, view_size=40,
                                           log_every=7, settings={"proj_dim": 16}))


def test_collapse_is_reported(tmp_path, monkeypatch, capsys):
    from sstl.engine.methods import cross

    monkeypatch.setattr(cross, "spread", lambda p: p.new_zeros(()))  # a collapsed run
    run = pretrain_mod.pretrain(pretrain_cfg(out=str(tmp_path), name="collapsed"))
    assert "have collapsed" in capsys.readouterr().err
    with open(run / "metrics.csv") as fh:
        assert float(next(csv.DictReader(fh))["spread"]) == 0.0
