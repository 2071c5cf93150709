"""Exit codes a script can trust: `sstl predict` with nothing readable, `sstl evaluate` without
data; and evaluate's --out folder with the figures."""
import csv
import dataclasses

import pytest
from typer.testing import CliRunner

from sstl.cli.main import app
from tests.tiny_run import make_run, write_pngs


def predict(tmp_path, *inputs):
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", *map(str, inputs), "--model", str(tmp_path / "run"),
                                 "--out-csv", str(out), "--device", "cpu"])
    with open(out, newline="") as fh:
        return r, list(csv.DictReader(fh))


def test_predict_fails_when_every_input_failed(tmp_path):
    make_run(tmp_path / "run")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r, rows = predict(tmp_path, tmp_path / "bad.png", tmp_path / "missing.png")
    assert r.exit_code != 0
    assert "no input could be read" in r.output and "bad.png" in r.output
    assert [row["error"] != "" for row in rows] == [True, True]  # the CSV still says why


def test_predict_succeeds_when_some_inputs_failed(tmp_path):
    make_run(tmp_path / "run")
    good = write_pngs(tmp_path / "imgs", n=2)
    r, rows = predict(tmp_path, *good, tmp_path / "missing.png")
    assert r.exit_code == 0, r.output
    assert [row["error"] for row in rows] == ["", "", "no such file or folder"]


def test_evaluate_without_data_refuses(tmp_path):
    make_run(tmp_path / "run")
    r = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code != 0 and "needs --data" in r.output
    assert "SYNTHETIC" not in r.output and "Traceback" not in r.output


def test_evaluate_with_data_writes_metrics_and_figures(tmp_path):
    make_run(tmp_path / "run")
    for k, cls in enumerate(("COVID", "Normal")):
        write_pngs(tmp_path / "data" / cls, n=3, seed=k)
    r = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "run"), "--data",
                                 str(tmp_path / "data"), "--out", str(tmp_path / "ev"),
                                 "--device", "cpu", "--cache-size", "48", "--workers", "1"])
    assert r.exit_code == 0, r.output
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0, name


def test_help_shows_the_defaults_written_in_the_help_strings():
    """Rich read "[default: ...]" as a markup tag and dropped it from every --help."""
    for command, text in (("pretrain", "[default: $SSTL_CACHE or ~/.cache/sstl]"),
                          ("pretrain", "[default: 0, all CPUs]"),
                          ("reproduce", "[default: 0.01 0.1 0.5 1]"),
                          ("export", "[default: model.onnx in the run directory]")):
        r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
        assert r.exit_code == 0 and text in r.output, (command, text)


def test_paths_with_brackets_are_printed_as_they_are(tmp_path, capsys):
    """A run under "runs[exp]" was announced as "runs" (Rich markup ate the brackets)."""
    from sstl.engine.runs import log

    log(f"done: {tmp_path}/runs[exp]/encoder.safetensors [red]x[/red]")
    assert f"{tmp_path}/runs[exp]/encoder.safetensors [red]x[/red]" in capsys.readouterr().err


def test_an_undefined_metric_is_one_warning_line(capfd):
    """sstl's own warnings print as its other messages do, not as Python's two-line form."""
    from sstl.cli import main
    from sstl.engine.metrics import MetricWarning

    main._show_warning(MetricWarning("AUC is undefined"), MetricWarning, __file__, 1)
    assert capfd.readouterr().err == "warning: AUC is undefined\n"
    # Another library's warning keeps Python's form.
    main._show_warning(UserWarning("x"), UserWarning, "/lib/mod.py", 7, line="")
    assert "/lib/mod.py:7: UserWarning: x" in capfd.readouterr().err


@pytest.mark.parametrize("args", [
    ["pretrain", "--data", ""], ["finetune", "--data", " "], ["pretrain", "--out="],
    ["finetune", "--encoder", ""], ["predict", "", "--model", "m"],
    ["evaluate", "--model", "m", "--data", ""], ["export", "--model", ""]])
def test_a_blank_path_is_refused_not_read_as_this_folder(args, tmp_path, monkeypatch):
    """Path("") is ".": `--data "$DATA"` with DATA unset would train on whatever folder the
    shell is in. A blank value is a usage error (exit 2) naming the option, before any work."""
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "here", n=2)  # images the blank value would have found
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "is blank" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # nothing was written


def test_supervised_takes_every_optimiser_setting_its_config_has(tmp_path, monkeypatch):
    """Stage 1 is tuned like fine-tuning: each SGD / loss field of SupervisedConfig has a flag
    that reaches the config (momentum and label smoothing had none)."""
    import sstl.engine.supervised as sup

    got = []
    monkeypatch.setattr(sup, "supervised", got.append)
    r = CliRunner().invoke(app, ["supervised", "--data", str(tmp_path), "--lr", "0.05",
                                 "--momentum", "0.8", "--weight-decay", "0.001",
                                 "--label-smoothing", "0.1", "--schedule", "constant"])
    assert r.exit_code == 0, r.output
    (cfg,) = got
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.label_smoothing, cfg.schedule) == (
        0.05, 0.8, 0.001, 0.1, "constant")


# Each command with only its required values, and the config it must hand to the engine:
# the dataclasses are the one place defaults live, so the CLI's must be theirs exactly.
def _defaults_cases():
    from sstl.engine.config import (BenchConfig, CacheConfig, EvaluateConfig,
                                    ExportConfig, FinetuneConfig, PredictConfig, PretrainConfig,
                                    ReproduceConfig, SupervisedConfig)
    return [
        (["pretrain"], "sstl.engine.pretrain:pretrain", PretrainConfig()),
        (["finetune"], "sstl.engine.finetune:finetune", FinetuneConfig()),
        (["supervised", "--data", "d"], "sstl.engine.supervised:supervised",
         SupervisedConfig(data=dataclasses.replace(SupervisedConfig().data, path="d"))),
        (["reproduce"], "sstl.engine.reproduce:reproduce", ReproduceConfig()),
        (["predict", "--model", "m", "x.png"], "sstl.engine.predict:predict",
         PredictConfig(model="m", inputs=("x.png",))),
        (["evaluate", "--model", "m", "--data", "d"], "sstl.engine.predict:evaluate",
         EvaluateConfig(model="m", data=dataclasses.replace(EvaluateConfig.data, path="d"))),
        (["bench"], "sstl.cli.bench:run", BenchConfig()),
        (["export", "--model", "m"], "sstl.engine.export:export", ExportConfig(model="m")),
        (["cache"], "sstl.cli.cache:run", CacheConfig()),
    ]


@pytest.mark.parametrize("case", range(9))
def test_every_commands_defaults_are_its_configs(case, monkeypatch):
    import importlib

    args, target, want = _defaults_cases()[case]
    module, name = target.split(":")
    got = []

    def engine(cfg):  # records what it was handed; the command then ends there
        got.append(cfg)
        raise SystemExit(0)
    monkeypatch.setattr(importlib.import_module(module), name, engine)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert got == [want]


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    """typer turns a KeyboardInterrupt in a command into a silent exit 130: the entry point
    says why it stopped. A command's own exit 130 (the loop's checkpointed stop) adds nothing."""
    import os
    import sys

    from sstl.cli import cache, main

    exits = []

    def exit_now(code):  # os._exit would end pytest too
        exits.append(code)
        raise SystemExit(code)
    monkeypatch.setattr(os, "_exit", exit_now)

    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(cache, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["sstl", "cache"])
    with pytest.raises(SystemExit) as e:
        main.cli()
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert exits == [130]  # at once, not through the interpreter's teardown

    def stopped(cfg):
        raise SystemExit(130)
    monkeypatch.setattr(cache, "run", stopped)
    with pytest.raises(SystemExit) as e:
        main.cli()
    assert e.value.code == 130 and capsys.readouterr().err == "" and exits == [130]
