"""Exit codes a script can trust: `sstl predict` with nothing readable, `sstl evaluate` without
data; and evaluate's --out folder with the figures."""
import csv

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
