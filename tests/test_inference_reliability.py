"""predict / evaluate / export on awkward inputs: the same scores as training, nothing dropped
without a trace, nothing half-written, strict JSON, file names shown as they are."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from sstl.engine.config import DataConfig, EvaluateConfig, PredictConfig
from sstl.engine.data.index import load_gray
from sstl.engine.io import save_json
from sstl.engine.predict import evaluate, predict, predictions_table
from tests.tiny_run import CLASSES, make_run, write_pngs


def _labelled(root: Path) -> Path:
    for i, cls in enumerate(("COVID", "Normal")):
        write_pngs(root / cls, n=4, side=72, seed=i)
    return root


def _csv(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {"/".join(Path(r["path"]).parts[-2:]): r for r in csv.DictReader(f)}


def test_evaluate_decodes_at_the_models_cache_size_as_predict_does(tmp_path, capsys):
    """A model trained on images decoded to 48 px must be scored on images decoded to 48 px:
    evaluate's numbers then equal predict's, image by image."""
    run = make_run(tmp_path / "run", image_size=32, cache_size=48)
    data = _labelled(tmp_path / "data")
    evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(data),
             cache_dir=str(tmp_path / "c"), cache_size=None), out=str(tmp_path / "ev"),
             device="cpu"))
    predict(PredictConfig(model=str(run), inputs=(str(data),), out_csv=str(tmp_path / "p.csv"),
                          device="cpu"))
    ev, pr = _csv(tmp_path / "ev" / "predictions.csv"), _csv(tmp_path / "p.csv")
    assert ev.keys() == pr.keys() and len(ev) == 8
    for name in ev:
        for c in ("COVID", "Normal"):
            assert float(ev[name][c]) == pytest.approx(float(pr[name][c]), abs=1e-6)
    capsys.readouterr()
    evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(data),
             cache_dir=str(tmp_path / "c"), cache_size=64), device="cpu"))
    assert "--cache-size 64, but the model was trained on images decoded to 48" in \
        capsys.readouterr().err


def test_evaluate_out_lists_the_files_it_could_not_score(tmp_path):
    run = make_run(tmp_path / "run")
    data = _labelled(tmp_path / "data")
    (data / "COVID" / "truncated.png").write_bytes((data / "COVID" / "img0.png").read_bytes()[:60])
    evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(data),
             cache_dir=str(tmp_path / "c"), cache_size=None), out=str(tmp_path / "ev"),
             device="cpu"))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (m["n"], m["found"], m["unreadable"]) == (8, 9, 1)
    report = json.loads((tmp_path / "ev" / "data_report.json").read_text())
    assert [e["path"] for e in report["skipped"]] == ["COVID/truncated.png"]


def test_a_float_image_with_a_nan_pixel_is_refused_not_scored_black(tmp_path):
    a = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    a[3, 5] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="1 non-finite pixel values"):
        load_gray(tmp_path / "nan.tif")
    a[3, 5] = 0.5
    Image.fromarray(a, mode="F").save(tmp_path / "ok.tif")
    assert load_gray(tmp_path / "ok.tif").max() == 255  # the finite file still decodes


@pytest.mark.parametrize("name", ["chest [pa view] 2020.png", "study[/x].png", "[bold]a[/bold].png"])
def test_file_names_are_shown_as_they_are_not_as_markup(name):
    rows = [{"path": name, "prediction": "COVID", "confidence": 0.9, "COVID": 0.9, "Normal": 0.1,
             "error": ""},
            {"path": "x/" + name, "prediction": "", "confidence": "", "COVID": "", "Normal": "",
             "error": "not an image [unrecognised]"}]
    console = Console(record=True, width=400)
    console.print(predictions_table(rows, ["COVID", "Normal"], "out [1].csv"))
    text = console.export_text()
    assert name in text and "x/" + name in text and "not an image [unrecognised]" in text
    assert "out [1].csv" in text


def test_a_failed_export_writes_nothing_and_keeps_the_verified_one(tmp_path):
    pytest.importorskip("onnxruntime")
    from sstl.engine.export import export_onnx

    run = make_run(tmp_path / "run")
    good = export_onnx(run, out=tmp_path / "m.onnx")
    assert good["ok"]
    before = ((tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.json").read_text())
    with pytest.raises(SystemExit, match="nothing was written"):
        export_onnx(run, out=tmp_path / "m.onnx", tolerance=-1.0)  # no export can pass
    assert ((tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.json").read_text()) == before
    with pytest.raises(SystemExit, match="nothing was written"):
        export_onnx(run, out=tmp_path / "new.onnx", tolerance=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json", "run"]


def test_weights_that_do_not_match_their_sidecar_are_one_clear_line(tmp_path):
    run = make_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "arch": "resnet50"}))
    with pytest.raises(SystemExit, match="does not match its sidecar model.json .resnet50, 2 "
                                         "classes.*copy the weights and their .json together"):
        predict(PredictConfig(model=str(run), inputs=(str(write_pngs(tmp_path / "i", 1)[0]),),
                              out_csv=str(tmp_path / "p.csv"), device="cpu"))


def test_damaged_weights_or_the_sidecar_named_as_the_model_are_one_line(tmp_path):
    """A model.safetensors cut short (a copy interrupted) is one line naming the file in
    predict, evaluate and export alike; so is --model naming the .json sidecar."""
    from sstl.engine.models import load_classifier

    run = make_run(tmp_path / "run")
    with pytest.raises(SystemExit, match="model.json: not a .safetensors file"):
        load_classifier(run / "model.json")
    f = run / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100_000])
    with pytest.raises(SystemExit, match="model.safetensors: not a readable weights file .*"
                                         "damaged or incomplete copy"):
        load_classifier(run)
    with pytest.raises(SystemExit, match="not a readable weights file"):
        predict(PredictConfig(model=str(run), inputs=(str(write_pngs(tmp_path / "i", 1)[0]),),
                              out_csv=str(tmp_path / "p.csv"), device="cpu"))


def test_evaluating_an_empty_test_split_says_so(tmp_path):
    """Two images a class hold none out at --test-fraction 0.2: --split test says the split
    is empty, not that every image was used to train the model."""
    run = make_run(tmp_path / "run")
    for c in ("COVID", "Normal"):
        write_pngs(tmp_path / "d" / c, n=2, seed=len(c))
    with pytest.raises(SystemExit, match="the test split of these 4 images is empty "
                                         r"\(--test-fraction 0.2\)"):
        evaluate(EvaluateConfig(model=str(run), split="test", device="cpu",
                                data=DataConfig(path=str(tmp_path / "d"),
                                                cache_dir=str(tmp_path / "c"))))


@pytest.mark.parametrize("code,advice", [
    ("ENOSPC", "(free some space or choose another --out-csv)"),
    ("EROFS", "(choose another --out-csv: this place is not writable)")])
def test_a_failed_write_names_the_option_and_the_cause(tmp_path, monkeypatch, code, advice):
    """predict's table is placed by --out-csv, not --out; a read-only place is not a full
    disk. Nothing is left behind."""
    import errno
    import os

    run = make_run(tmp_path / "run")
    imgs = write_pngs(tmp_path / "i", 1)

    def failed(*a):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    monkeypatch.setattr(os, "replace", failed)
    with pytest.raises(SystemExit) as e:
        predict(PredictConfig(model=str(run), inputs=(str(imgs[0]),),
                              out_csv=str(tmp_path / "o" / "p.csv"), device="cpu"))
    assert str(e.value) == (f"could not write {tmp_path / 'o' / 'p.csv'}: "
                            f"{os.strerror(getattr(errno, code))} {advice}")
    assert list((tmp_path / "o").iterdir()) == []


def test_json_files_are_strict_an_undefined_number_is_null(tmp_path):
    save_json({"auc": float("nan"), "x": [1.0, float("inf")], "n": np.float32("nan"), "ok": 0.5},
              tmp_path / "m.json")
    strict = json.loads((tmp_path / "m.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict == {"auc": None, "x": [1.0, None], "n": None, "ok": 0.5}
    assert math.isnan(np.array([strict["auc"]], dtype=np.float64)[0])  # how readers get NaN back


def test_output_paths_of_the_wrong_kind_are_refused_before_inference(tmp_path):
    run = make_run(tmp_path / "run")
    write_pngs(tmp_path / "imgs", n=2)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="--out-csv .*a_folder is a folder"):
        predict(PredictConfig(model=str(run), inputs=(str(tmp_path / "imgs"),),
                              out_csv=str(tmp_path / "a_folder"), device="cpu"))
    with pytest.raises(SystemExit, match="--cam .*a_file is a file"):
        predict(PredictConfig(model=str(run), inputs=(str(tmp_path / "imgs"),),
                              out_csv=str(tmp_path / "p.csv"), cam=str(tmp_path / "a_file")))
    with pytest.raises(SystemExit, match="--out .*a_file is a file"):
        evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(tmp_path / "imgs")),
                                out=str(tmp_path / "a_file")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder", "imgs", "run"]


def test_predict_never_writes_its_table_over_another_file(tmp_path):
    """--out-csv naming an input X-ray, the model's sidecar, the run's metrics.csv or a
    manifest (its header starts `path,` too) is refused before inference, the file untouched;
    an earlier predictions table is replaced."""
    run = make_run(tmp_path / "run")
    imgs = write_pngs(tmp_path / "imgs", n=2)
    (run / "metrics.csv").write_text("epoch,loss\n0,1.5\n")
    (tmp_path / "m.csv").write_text("path,label,group\na.png,COVID,p1\n")  # a manifest
    victims = [imgs[0], run / "model.json", run / "metrics.csv", tmp_path / "m.csv"]
    before = {v: v.read_bytes() for v in victims}
    for v in victims:
        with pytest.raises(SystemExit, match="exists and is not an earlier predictions file"):
            predict(PredictConfig(model=str(run), inputs=(str(tmp_path / "imgs"),),
                                  out_csv=str(v), device="cpu"))
    assert {v: v.read_bytes() for v in victims} == before
    out = tmp_path / "p.csv"
    for _ in range(2):  # the second run replaces the first's table
        predict(PredictConfig(model=str(run), inputs=(str(tmp_path / "imgs"),),
                              out_csv=str(out), device="cpu"))
        assert out.read_text().startswith("path,") and len(out.read_text().splitlines()) == 3


def test_predict_never_replaces_an_evaluations_predictions(tmp_path):
    """--out-csv naming the predictions.csv of an `sstl evaluate --out` folder is refused, the
    folder untouched (its metrics.json describes those rows); an earlier predict's
    predictions.csv, with no evaluation beside it, is still replaced."""
    run = make_run(tmp_path / "run")
    data = _labelled(tmp_path / "data")
    evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(data),
             cache_dir=str(tmp_path / "c")), out=str(tmp_path / "ev"), device="cpu"))
    table = tmp_path / "ev" / "predictions.csv"
    before = table.read_bytes()
    predict_there = PredictConfig(model=str(run), inputs=(str(data / "COVID"),),
                                  out_csv=str(table), device="cpu")
    with pytest.raises(SystemExit, match="ev/predictions.csv is the predictions.csv of an "
                       "`sstl evaluate` folder .*name a new file"):
        predict(predict_there)
    assert table.read_bytes() == before
    mine = tmp_path / "mine" / "predictions.csv"
    for _ in range(2):  # predict's own table, replaced by the second run
        predict(dataclasses.replace(predict_there, out_csv=str(mine)))
    assert len(mine.read_text().splitlines()) == 5


def test_evaluate_replaces_an_earlier_evaluation_and_no_other_files(tmp_path):
    """evaluate --out into a folder holding a file of its own names that no evaluation wrote
    (a user's metrics.json, a manifest as predictions.csv) is refused before inference, the
    files untouched; an earlier evaluation's folder is written again."""
    run = make_run(tmp_path / "run")
    for k, name in enumerate(CLASSES):
        write_pngs(tmp_path / "imgs" / name, n=2, seed=k)
    ev = EvaluateConfig(model=str(run), data=DataConfig(path=str(tmp_path / "imgs"),
                                                        cache_size=48),
                        out=str(tmp_path / "ev"), split="all", device="cpu")
    evaluate(ev)
    evaluate(ev)  # its own earlier files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my": 1}')
    with pytest.raises(SystemExit, match="holds metrics.json, which no earlier evaluation"):
        evaluate(dataclasses.replace(ev, out=str(mine)))
    (tmp_path / "ev" / "predictions.csv").write_text("path,label\na.png,COVID\n")
    with pytest.raises(SystemExit, match="holds predictions.csv, which no earlier evaluation"):
        evaluate(ev)
    assert (mine / "metrics.json").read_text() == '{"my": 1}'
    assert (tmp_path / "ev" / "predictions.csv").read_text() == "path,label\na.png,COVID\n"
    # Found by a user: a folder of X-rays took roc.png and confusion_matrix.png, which a later
    # predict on that folder scored as images. Any file of the user's refuses it.
    xrays = tmp_path / "xrays"
    write_pngs(xrays, n=2)
    (xrays / ".DS_Store").write_text("")
    with pytest.raises(SystemExit, match="holds img0.png, which no earlier evaluation wrote"):
        evaluate(dataclasses.replace(ev, out=str(xrays)))
    assert sorted(p.name for p in xrays.iterdir()) == [".DS_Store", "img0.png", "img1.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_text("")  # hidden files alone: still an empty folder
    evaluate(dataclasses.replace(ev, out=str(empty)))
    assert (empty / "metrics.json").is_file()


def test_evaluates_figures_name_the_model_and_the_data(tmp_path, monkeypatch):
    """roc.png and confusion_matrix.png pasted into a report say which model on which data:
    their titles name the run, the data folder (a manifest with its folder) and the images."""
    import sstl.engine.evaluation as evaluation

    titles = {}
    for name in ("roc_figure", "confusion_figure"):
        def keep(*args, _draw=getattr(evaluation, name), _name=name):
            fig = _draw(*args)
            titles[_name] = " ".join(fig.axes[0].get_title().split())  # unwrapped
            return fig
        monkeypatch.setattr(evaluation, name, keep)
    run = make_run(tmp_path / "ft-resnet18-ward7-1pct-seed0")  # long: the titles wrap
    data = _labelled(tmp_path / "hospital-east-portable")
    ev = EvaluateConfig(model=str(run / "model.safetensors"), data=DataConfig(
        path=str(data), cache_dir=str(tmp_path / "c")), out=str(tmp_path / "ev"), device="cpu")
    evaluate(ev)
    what = "model ft-resnet18-ward7-1pct-seed0 on hospital-east-portable, all images: 8 images"
    assert titles == {"roc_figure": f"ROC, {what}",
                      "confusion_figure": f"Confusion matrix, {what}"}
    manifest = data / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(
        f"{p.relative_to(data).as_posix()},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    evaluate(dataclasses.replace(ev, data=dataclasses.replace(ev.data, path=str(manifest))))
    assert titles["roc_figure"] == f"ROC, {what.replace('portable,', 'portable/manifest.csv,')}"


def test_another_test_split_of_the_training_data_says_where_training_took_its_own():
    """The model's own images with a test split other than training's: other flags are
    named; with the same flags, what else makes a split (a manifest's columns, labels)."""
    from sstl.engine.predict import test_split

    class Images:  # the model's data (same fingerprint), another test split
        test_idx, records = np.array([0]), [None, None]

        def fingerprint(self, idx=None):
            return "all" if idx is None else "other test"
    meta = {"data_fingerprint": "all", "test_fingerprint": "its test", "split_seed": 0,
            "test_fraction": 0.2}
    with pytest.raises(SystemExit, match="pass --split-seed 0 --test-fraction 0.2$"):
        test_split(Images(), meta, DataConfig(split_seed=3, test_fraction=0.2))
    with pytest.raises(SystemExit, match="`group` column .*give --data as training read it$"):
        test_split(Images(), meta, DataConfig(split_seed=0, test_fraction=0.2))


def test_an_unwritable_output_place_is_refused_before_inference(tmp_path, monkeypatch):
    """A read-only --out or --out-csv folder (os.access says so, as on a read-only mount)
    is found before the model runs, not after, when the results would be lost."""
    import os

    run = make_run(tmp_path / "run")
    write_pngs(tmp_path / "imgs", n=2)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != ro and real(p, mode, **k))
    with pytest.raises(SystemExit, match="--out .*ro/ev: that place is not writable"):
        evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(tmp_path / "imgs")),
                                out=str(ro / "ev")))
    with pytest.raises(SystemExit, match="--out-csv .*ro/p.csv: its folder is not writable"):
        predict(PredictConfig(model=str(run), inputs=(str(tmp_path / "imgs"),),
                              out_csv=str(ro / "p.csv")))


def test_predict_and_evaluate_take_a_precision(tmp_path):
    """--precision reaches the inference runtime (fp32 matches the ONNX export on a GPU);
    nonsense is refused by check()."""
    from typer.testing import CliRunner

    from sstl.cli.main import app

    run = make_run(tmp_path / "run")
    write_pngs(tmp_path / "imgs", n=2)
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "imgs"), "--model", str(run),
                                 "--out-csv", str(tmp_path / "p.csv"), "--device", "cpu",
                                 "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "imgs"), "--model", str(run),
                                 "--precision", "fp8"])
    assert r.exit_code not in (0, None) and "--precision must be auto, bf16 or fp32" in r.output


def test_predict_cam_without_grad_cam_fails_before_any_image(tmp_path, monkeypatch):
    import sys

    run = make_run(tmp_path / "run")
    write_pngs(tmp_path / "imgs", n=2)
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as if not installed
    with pytest.raises(SystemExit, match="Grad-CAM needs pytorch-grad-cam"):
        predict(PredictConfig(model=str(run), inputs=(str(tmp_path / "imgs"),), device="cpu",
                              out_csv=str(tmp_path / "p.csv"), cam=str(tmp_path / "cam")))
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "cam").exists()


def test_predict_on_a_folder_accounts_for_every_image_it_holds(tmp_path):
    """Oracle: os.walk with links followed. Each image is a prediction or lies under a row
    that says why it was left out (hidden, masks, a linked folder), never dropped unsaid."""
    import os

    make_run(tmp_path / "run")
    d = tmp_path / "in"
    write_pngs(d, n=2)
    write_pngs(d / "sub" / "Masks", n=1)
    write_pngs(d / ".cache", n=1)
    write_pngs(tmp_path / "elsewhere", n=3)
    (d / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (d / "img0.png").rename(d / ".hidden.png")
    out = tmp_path / "p.csv"
    rows = predict(PredictConfig(model=str(tmp_path / "run"), inputs=(str(d),),
                                 out_csv=str(out), device="cpu"))
    files = sorted(os.path.join(p, f) for p, _, fs in os.walk(d, followlinks=True) for f in fs)
    assert len(files) == 7
    for f in files:
        assert any(r["path"] == f and r["error"] == "" or r["error"].startswith("left out: ")
                   and (f == r["path"] or f.startswith(r["path"] + os.sep)) for r in rows), f
    left = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert left == {".hidden.png": "left out: hidden file",
                    "Masks": "left out: segmentation mask folder (1 image file; name it to "
                             "predict them)",
                    ".cache": "left out: hidden folder (1 image file; name it to predict them)",
                    "linked": "left out: link to a folder (not followed) (3 image files; name "
                              "it to predict them)"}
    with open(out) as fh:
        assert [r["error"] for r in csv.DictReader(fh)] == [r["error"] for r in rows]
    table = predictions_table(rows, ["COVID", "Normal"], out)
    assert table.title.startswith("1 predicted, 0 unreadable, 4 left out")


def test_a_model_of_the_synthetic_demo_set_is_said_in_predict_and_evaluate(tmp_path, capsys):
    run = make_run(tmp_path / "run")  # synthetic_data: True
    imgs = write_pngs(tmp_path / "imgs", n=1)
    predict(PredictConfig(model=str(run), inputs=(str(imgs[0]),), out_csv=str(tmp_path / "p.csv"),
                          device="cpu"))
    evaluate(EvaluateConfig(model=str(run), data=DataConfig(
        path=str(_labelled(tmp_path / "data")), cache_dir=str(tmp_path / "c"), cache_size=None),
        device="cpu"))
    assert capsys.readouterr().err.count("trained on the SYNTHETIC demo set") == 2
    meta = json.loads((run / "model.json").read_text())
    save_json({**meta, "synthetic_data": False}, run / "model.json")
    predict(PredictConfig(model=str(run), inputs=(str(imgs[0]),), out_csv=str(tmp_path / "p.csv"),
                          device="cpu"))
    assert "SYNTHETIC" not in capsys.readouterr().err


def test_grad_cam_rows_name_their_overlay_and_a_used_folder_is_refused(tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    run = make_run(tmp_path / "run")
    d = tmp_path / "in"
    imgs = write_pngs(d, n=2)
    (d / "bad.png").write_bytes(b"not a png")
    cfg = PredictConfig(model=str(run), inputs=(str(d),), out_csv=str(tmp_path / "p.csv"),
                        device="cpu", cam=str(tmp_path / "cam"))
    rows = predict(cfg)
    with open(tmp_path / "p.csv") as fh:
        cams = {Path(r["path"]).name: r["cam"] for r in csv.DictReader(fh)}
    assert cams["bad.png"] == "" and sorted(Path(c).name for c in cams.values() if c) == sorted(
        p.name for p in (tmp_path / "cam").iterdir())  # each overlay is one row's, and only one
    for r in rows:
        if r["cam"]:
            assert Path(r["cam"]).name.endswith(f"-{Path(r['path']).stem}-{r['prediction']}.png")
    assert len({r["cam"] for r in rows if r["cam"]}) == len(imgs)
    with pytest.raises(SystemExit, match="already holds files"):  # old and new would mix
        predict(cfg)
    with pytest.raises(SystemExit, match="inside the input"):  # overlays read back as X-rays
        predict(PredictConfig(model=str(run), inputs=(str(d),), out_csv=str(tmp_path / "q.csv"),
                              device="cpu", cam=str(d / "cam")))
    assert not (d / "cam").exists() and not (tmp_path / "q.csv").exists()


@pytest.mark.parametrize("where", ["run", "data"])
def test_evaluate_out_never_writes_into_a_run_or_the_data(tmp_path, where):
    run = make_run(tmp_path / "run")
    data = _labelled(tmp_path / "data")
    out = run if where == "run" else data / "eval"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="run directory" if where == "run" else "inside --data"):
        evaluate(EvaluateConfig(model=str(run), data=DataConfig(
            path=str(data), cache_dir=str(tmp_path / "c"), cache_size=None), out=str(out),
            device="cpu"))
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_evaluate_out_beside_a_manifest_is_allowed(tmp_path):
    """A manifest reads only the files it lists: an --out folder beside it changes nothing."""
    from sstl.engine.config import check

    data = _labelled(tmp_path / "data")
    (data / "manifest.csv").write_text("path,label\n" + "".join(
        f"{p.relative_to(data).as_posix()},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    cfg = EvaluateConfig(model="m", data=DataConfig(path=str(data / "manifest.csv")),
                         out=str(data / "eval"))
    assert check(cfg) is cfg


def test_export_out_must_be_an_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    from sstl.engine.config import ExportConfig
    from sstl.engine.export import export

    run = make_run(tmp_path / "run")
    before = (run / "model.json").read_bytes()
    for name in ("model.json", "model.safetensors"):
        with pytest.raises(SystemExit, match="name a .onnx file"):
            export(ExportConfig(model=str(run), out=str(run / name)))
    assert (run / "model.json").read_bytes() == before
    assert export(ExportConfig(model=str(run), out=str(tmp_path / "m.ONNX")))["ok"]


@pytest.mark.parametrize("damage", ["cut", "no_image_size", "no_cache_size"])
def test_a_damaged_or_older_sidecar_is_one_line_or_read_alike_everywhere(tmp_path, damage):
    """A sidecar cut short or without a required key: one line naming the file, not a
    traceback. Without cache_size (older models): predict and evaluate both take 224."""
    from sstl.engine.models import load_classifier

    run = make_run(tmp_path / "run", cache_size=224)
    text = (run / "model.json").read_text()
    meta = json.loads(text)
    if damage == "cut":
        (run / "model.json").write_text(text[:200])
    else:
        save_json({k: v for k, v in meta.items() if k != damage.removeprefix("no_")},
                  run / "model.json")
    if damage == "no_cache_size":
        assert load_classifier(run)[1]["cache_size"] == 224
        return
    with pytest.raises(SystemExit, match="model.json: not a readable sidecar" if damage == "cut"
                       else "model.json lacks image_size"):
        load_classifier(run)


def test_metrics_recomputed_from_evaluates_csv_are_the_reported_ones(tmp_path, monkeypatch):
    """predictions.csv keeps every probability exactly (float32 in 9 digits): scikit-learn's
    AUC and accuracy from the file equal metrics.json's. Six decimals tied small scores:
    here COVID scores of 1e-7 .. 8e-7, all 0.000000 or 0.000001 at six decimals."""
    import torch
    from sklearn.metrics import accuracy_score, roc_auc_score

    import sstl.engine.predict as predict_mod

    def small(model, batches, autocast):
        n = sum(len(x) for x in batches)
        covid = torch.tensor([(7 * i % n + 1) * 1e-7 for i in range(n)], dtype=torch.float32)
        return torch.stack([covid, 1 - covid], dim=1)
    monkeypatch.setattr(predict_mod, "class_probs", small)
    run = make_run(tmp_path / "run")
    data = _labelled(tmp_path / "data")
    m = evaluate(EvaluateConfig(model=str(run), data=DataConfig(path=str(data),
                 cache_dir=str(tmp_path / "c"), cache_size=None), out=str(tmp_path / "ev"),
                 device="cpu"))
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    covid = np.array([r["COVID"] for r in rows], dtype=np.float32)  # 9 digits: float32 exactly
    truth = np.array([r["label"] == "COVID" for r in rows])
    assert roc_auc_score(truth, covid) == m["auc"]
    assert accuracy_score([r["label"] for r in rows], [r["prediction"] for r in rows]) == m["acc"]


def test_a_manifest_given_to_predict_is_pointed_to_evaluate(tmp_path):
    """Found by a user: `predict manifest.csv` said "not an image (unrecognised format)"; a CSV
    is a manifest, which evaluate scores. Images beside it are still predicted."""
    from sstl.engine.predict import image_files

    (tmp_path / "manifest.csv").write_text("path,label\nimg0.png,COVID\n")
    write_pngs(tmp_path, n=1)
    rows = dict(image_files([tmp_path / "manifest.csv", tmp_path / "img0.png"]))
    assert rows[str(tmp_path / "img0.png")] is None
    assert "not an image: predict takes images and folders; to score a labelled manifest use " \
           "sstl evaluate --data" in rows[str(tmp_path / "manifest.csv")]
