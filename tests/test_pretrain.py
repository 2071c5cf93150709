"""End to end: `sstl pretrain` learns, writes a loadable encoder, and resumes exactly."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sstl.cli.main import app
from sstl.engine import pretrain as pretrain_mod
from sstl.engine.config import AugmentConfig, DataConfig, PretrainConfig
from sstl.engine.models import backbone

from .conftest import CXR_SMALL, needs_shared


def _losses(run):
    with open(run / "metrics.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


@needs_shared
def test_pretrain_cxr_small_learns_and_encoder_loads(tmp_path):
    args = ["pretrain", "--data", str(CXR_SMALL), "--arch", "resnet18", "--init", "random",
            "--epochs", "3", "--batch-size", "32", "--view-size", "64", "--out", str(tmp_path),
            "--name", "e2e", "--device", "cpu", "--no-compile"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "e2e"
    losses = _losses(run)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    for name in ("config.json", "split.json", "data_report.json", "checkpoint.pt", "encoder.json"):
        assert (run / name).exists(), name
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["arch"] == "resnet18" and meta["epoch"] == 3
    net = backbone("resnet18", init=str(run / "encoder.safetensors"))
    sd = load_file(run / "encoder.safetensors")
    torch.testing.assert_close(net.state_dict()["conv1.weight"], sd["conv1.weight"])
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 120 and not set(split["test"]) & set(split["train"])


def _cfg(tmp_path, name, epochs, **kw):
    return PretrainConfig(data=DataConfig(cache_size=64), out=str(tmp_path), name=name,
                          arch="resnet18", init="random", epochs=epochs, batch_size=32,
                          augment=AugmentConfig(size=32), device="cpu", compile=False,
                          proj_hidden=64, pred_hidden=128, log_every=1, **kw)


def _weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=False)["method"]


def test_mid_epoch_resume_is_exact(tmp_path, monkeypatch):
    full = pretrain_mod.pretrain(_cfg(tmp_path, "full", 2, checkpoint_every=2))
    calls = {"n": 0}
    real_step = pretrain_mod.ssl_step

    def crash_at_step_9(*a):  # epoch 1, step 3 (6 steps per epoch); last checkpoint: step 2
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real_step(*a)

    monkeypatch.setattr(pretrain_mod, "ssl_step", crash_at_step_9)
    with pytest.raises(SystemExit):
        pretrain_mod.pretrain(_cfg(tmp_path, "resumed", 2, checkpoint_every=2))
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (1, 2)
    monkeypatch.setattr(pretrain_mod, "ssl_step", real_step)
    resumed = pretrain_mod.pretrain(_cfg(tmp_path, "resumed", 2, checkpoint_every=2))
    a, b = _weights(full), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert len(_losses(resumed)) == 2


def test_resume_refuses_other_settings(tmp_path):
    pretrain_mod.pretrain(_cfg(tmp_path, "r", 1))
    with pytest.raises(SystemExit, match="different settings"):
        pretrain_mod.pretrain(_cfg(tmp_path, "r", 2, lr=0.1))


def test_collapse_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain_mod, "spread", lambda p: p.new_zeros(()))  # a collapsed run
    run = pretrain_mod.pretrain(_cfg(tmp_path, "collapsed", 1))
    assert "have collapsed" in capsys.readouterr().err
    with open(run / "metrics.csv") as fh:
        assert float(next(csv.DictReader(fh))["spread"]) == 0.0
