"""End to end: `sstl finetune` learns, keeps the test split unseen, resumes, and its model
is usable by `sstl predict` and `sstl evaluate`. Small and fast: resnet18 at 64 px on a CPU."""
from __future__ import annotations

import csv
import math
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from sstl.cli.main import app
from sstl.engine import loop
from sstl.engine.config import DataConfig, FinetuneConfig, PretrainConfig
from sstl.engine.data.index import DataError
from sstl.engine.data.synthetic import CLASSES, ensure_synthetic
from sstl.engine.finetune import finetune
from sstl.engine.metrics import METRICS
from sstl.engine.config import EvaluateConfig
from sstl.engine.predict import evaluate
from sstl.engine.pretrain import pretrain

from .configs import finetune_cfg, pretrain_cfg
from .conftest import CXR_SMALL, needs_shared

ACC_BAR = 0.5  # test accuracy on cxr-small's 4 balanced classes; chance is 0.25


def _ft(out, name, data=None, **kw) -> FinetuneConfig:
    return finetune_cfg(path=data, out=str(out), name=name, **kw)


def _pt(out, name, data=None, **kw) -> PretrainConfig:
    return pretrain_cfg(path=data, out=str(out), name=name, view_size=64, **kw)


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def session_cache(tmp_path_factory):
    """Module fixtures run before conftest's per-test cache variable: point them at the same one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSTL_CACHE", str(tmp_path_factory.getbasetemp() / "sstl-cache"))
        yield


@pytest.fixture(scope="module")
def syn_runs(tmp_path_factory, session_cache):
    """Synthetic-set runs at two fractions (one epoch: for the bookkeeping, not the accuracy)."""
    out = tmp_path_factory.mktemp("ft-syn")
    return {f: finetune(_ft(out, f"frac{f}", fraction=f)) for f in (0.01, 0.1)}


@pytest.fixture(scope="module")
def syn_encoder(tmp_path_factory, session_cache):
    """A real encoder from `sstl pretrain` on the synthetic set (one epoch, 6 steps)."""
    return pretrain(_pt(tmp_path_factory.mktemp("pt-syn"), "enc"))


def test_fraction_subsets_stay_in_the_training_split(syn_runs):
    subsets = {}
    for f, run in syn_runs.items():
        split, sub = _json(run / "split.json"), _json(run / "subset.json")
        train, test, chosen = set(split["train"]), set(split["test"]), set(sub["train"])
        assert chosen <= train and not chosen & test, f
        assert sub["fraction"] == f and sub["n"] == len(chosen)
        assert set(sub["per_class"]) == set(CLASSES)
        # Each class's share of its training images, at least one (one image per group here).
        in_train = Counter(rel.split("/")[0] for rel in train)
        assert sub["per_class"] == {c: max(1, math.ceil(f * n)) for c, n in in_train.items()}, f
        assert len(test) == 52  # always the full 20%, whatever the fraction
        subsets[f] = chosen
    assert subsets[0.01] < subsets[0.1]  # nested
    assert _json(syn_runs[0.01] / "subset.json")["per_class"] == {
        "Normal": 1, "COVID": 1, "Viral Pneumonia": 1, "Bacterial Pneumonia": 1}
    # 1% of 204 training images, one per class, is 4 (1.96%): the card says what was taken.
    s = _json(syn_runs[0.01] / "summary.json")
    assert (s["n_train"], s["n_train_split"], s["fraction_taken"]) == (4, 204, 0.0196)
    assert "- Labelled fraction of the training split: 0.01 requested; taken: 4 of its 204 " \
           "images (1.96%: whole groups, at least one per class)" in \
           (syn_runs[0.01] / "MODEL_CARD.md").read_text()


def test_run_directory_holds_the_protocols_outputs(syn_runs):
    run = syn_runs[0.1]
    rows = _rows(run)
    assert len(rows) == 1 and all(k in rows[0] for k in METRICS)
    assert "recall/COVID" in rows[0]
    s = _json(run / "summary.json")
    assert set(s["last_epochs"]) >= set(METRICS) and s["best"]["by"] == "hm"
    assert s["last_epochs"]["acc"]["mean"] == pytest.approx(float(rows[0]["acc"]))
    for name in ("model.safetensors", "model.json", "checkpoint.pt", "config.json",
                 "confusion_matrix.png", "roc.png", "data_report.json"):
        assert (run / name).exists(), name
    meta = _json(run / "model.json")
    assert meta["class_names"] == ["Bacterial Pneumonia", "COVID", "Normal", "Viral Pneumonia"]
    assert meta["positive_class"] == "COVID" and meta["image_size"] == 64


def test_tiny_fraction_warns_and_completes(tmp_path, capsys):
    run = finetune(_ft(tmp_path, "tiny", fraction=0.01, epochs=2))
    assert "few training images" in capsys.readouterr().err
    assert len(_rows(run)) == 2 and (run / "summary.json").exists()


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    full = finetune(_ft(tmp_path, "full", fraction=0.1, epochs=2))
    real, calls = loop.train_step, {"n": 0}

    def killed_in_epoch_two(t, batch, step):  # 0.1 of the 204 training images: 1 step/epoch
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(t, batch, step)

    monkeypatch.setattr(loop, "train_step", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(_ft(tmp_path, "killed", fraction=0.1, epochs=2, checkpoint_every=1))
    assert len(_rows(tmp_path / "killed")) == 1
    monkeypatch.setattr(loop, "train_step", real)
    resumed = finetune(_ft(tmp_path, "killed", fraction=0.1, epochs=2, checkpoint_every=1))
    assert len(_rows(resumed)) == 2
    for a, b in zip(_rows(full), _rows(resumed)):
        for k in ("loss", *METRICS):
            assert float(a[k]) == float(b[k]), k  # bitwise on the CPU


def test_encoder_from_another_split_is_refused(syn_encoder, tmp_path):
    args = ["finetune", "--encoder", str(syn_encoder), "--arch", "resnet18", "--split-seed", "1",
            "--image-size", "64", "--epochs", "1", "--out", str(tmp_path), "--name", "x",
            "--device", "cpu", "--no-compile"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "another train/test split" in result.output and "--split-seed 0" in result.output
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(SystemExit, match="resnet18 backbone but --arch is resnet50"):
        finetune(_ft(tmp_path, "y", encoder=str(syn_encoder), arch="resnet50"))
    (tmp_path / "xray.png").write_bytes(b"\x89PNG")  # not weights: said as such
    with pytest.raises(SystemExit, match="xray.png: not a .safetensors file; give the "
                                         "encoder.safetensors"):
        finetune(_ft(tmp_path, "z", encoder=str(tmp_path / "xray.png")))


def test_encoder_from_other_data_warns_and_trains(syn_encoder, tmp_path, capsys):
    from .tiny_run import write_pngs

    for cls in ("COVID", "Normal"):  # another set: images the encoder never saw
        write_pngs(tmp_path / "d" / cls, n=5, seed=len(cls))
    run = finetune(_ft(tmp_path, "other", tmp_path / "d", encoder=str(syn_encoder)))
    said = capsys.readouterr().err
    assert "pretrained on other images than --data (the embedded SYNTHETIC set); none of " \
        "this run's test images is among them" in said
    assert _json(run / "summary.json")["class_names"] == ["COVID", "Normal"]


def test_encoder_that_saw_the_test_images_under_other_names_is_refused(syn_encoder, tmp_path):
    """A pool pretrained on, then a labelled folder that shares files with it (copied, moved,
    renamed): the images are the same, whatever their paths, and the check says so. Oracle:
    the encoder's own split list and this run's, matched by file bytes here."""
    import hashlib

    from sstl.engine.data.dataset import load_dataset

    src = ensure_synthetic()
    for f in sorted((src / "COVID").glob("*.png"))[:12] + sorted((src / "Normal").glob("*.png"))[:12]:
        (tmp_path / "d" / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "d" / f.parent.name / f"renamed-{f.name}")
    ds = load_dataset(DataConfig(path=str(tmp_path / "d")), need_labels=True, log=lambda m: None)
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    pretrained = {digest(src / rel) for rel in _json(syn_encoder / "split.json")["train"]}
    seen = sum(digest(ds.records[i].path) in pretrained for i in ds.test_idx)
    assert seen  # the precondition: some of this run's test images were pretrained on
    with pytest.raises(SystemExit, match=f"pretrained on {seen} of this run's "
                                         f"{len(ds.test_idx)} test images.*same bytes"):
        finetune(_ft(tmp_path, "leak", tmp_path / "d", encoder=str(syn_encoder)))


def test_missing_positive_class_lists_the_classes(tmp_path):
    with pytest.raises(DataError, match="'Flu' is not a class.*'Bacterial Pneumonia', 'COVID'"):
        finetune(_ft(tmp_path, "z", positive_class="Flu"))


@pytest.mark.parametrize("covid_side,message", [
    ("train", "the test split \\(4 images\\) has no image of 'COVID'"),
    ("test", "the training split has no image of 'COVID'")])
def test_a_split_without_a_class_on_one_side_is_refused_before_training(tmp_path, covid_side,
                                                                         message):
    """A test split without COVID would train to the end with Sen, HM and AUC undefined at
    every epoch; a training split without it would train a classifier that never saw it."""
    from .tiny_run import write_pngs

    rows = ["path,label,split"]
    for cls, side in (("COVID", covid_side), ("Normal", None)):
        for i, f in enumerate(write_pngs(tmp_path / "data" / cls, n=10, seed=len(cls))):
            rows.append(f"{cls}/{f.name},{cls},{side or ('test' if i < 4 else 'train')}")
    (tmp_path / "data" / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message):
        finetune(_ft(tmp_path, "z", data=tmp_path / "data", cache_size=64))
    assert not (tmp_path / "z").exists()  # refused before the run directory was made


def test_a_class_missing_from_the_test_split_is_warned_about(capsys):
    """Found by a user: a class with no test image gave `recall nan ± nan` in the card with
    nothing said. The run goes on (COVID-vs-rest metrics stand) with a warning naming it."""
    from types import SimpleNamespace

    from sstl.engine.finetune import check_split_classes

    names = ["COVID", "Normal", "Viral Pneumonia"]
    targets = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ds = SimpleNamespace(class_names=names, targets=targets, train_idx=np.arange(6),
                         test_idx=np.array([6, 7]))
    check_split_classes(ds, "COVID")
    assert "warning: the test split has no image of 'Viral Pneumonia': its recall will be " \
           "NaN" in capsys.readouterr().err
    check_split_classes(SimpleNamespace(**{**vars(ds), "test_idx": np.array([5, 6, 7])}),
                        "COVID")
    assert "warning" not in capsys.readouterr().err  # every class there: nothing to say


def test_predict_reports_bad_files_and_predicts_the_rest(syn_runs, tmp_path):
    src = sorted((ensure_synthetic() / "COVID").glob("*.png"))
    folder = tmp_path / "images"
    folder.mkdir()
    for f in src[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out_csv = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(folder), "--model", str(syn_runs[0.1]),
                                      "--out-csv", str(out_csv), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(out_csv) as fh:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert len(rows) == 4 and rows["broken.png"]["error"] and not rows["broken.png"]["prediction"]
    names = _json(syn_runs[0.1] / "model.json")["class_names"]
    for name, r in rows.items():
        if name != "broken.png":
            assert not r["error"] and r["prediction"] in names
            assert sum(float(r[c]) for c in names) == pytest.approx(1.0, abs=1e-5)


def test_evaluate_reproduces_the_last_epoch(syn_runs):
    run = syn_runs[0.1]
    m = evaluate(EvaluateConfig(model=str(run), split="test", device="cpu"))
    last = _rows(run)[-1]
    for k in (*METRICS, "recall/COVID"):
        assert m[k] == pytest.approx(float(last[k]), abs=1e-6, nan_ok=True), k
    with pytest.raises(SystemExit, match="--split-seed 0"):
        evaluate(EvaluateConfig(model=str(run), split="test", data=DataConfig(split_seed=3)))


def test_a_threshold_moves_the_operating_point_in_every_output(syn_runs, tmp_path):
    """--threshold T: COVID wherever P(COVID) >= T. Oracle: predictions.csv's probabilities
    with the rule applied by hand, and sklearn's metrics of that decision; predict gives the
    same rows; metrics.json and the ROC's marker say the rule."""
    from sklearn.metrics import accuracy_score, recall_score

    from sstl.engine.config import PredictConfig
    from sstl.engine.predict import predict

    run, out = syn_runs[0.1], tmp_path / "ev"
    data = DataConfig(path=str(ensure_synthetic()))
    m = evaluate(EvaluateConfig(model=str(run), data=data, split="test", out=str(out),
                                device="cpu", threshold=0.05))
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    names = _json(run / "model.json")["class_names"]
    probs = np.array([[float(r[c]) for c in names] for r in rows])
    covid = names.index("COVID")
    want = np.where(probs[:, covid] >= 0.05, covid,
                    np.where(np.arange(len(names)) == covid, -1, probs).argmax(1))
    assert [names.index(r["prediction"]) for r in rows] == list(want)
    assert (want == covid).sum() > (probs.argmax(1) == covid).sum()  # the point moved
    y = np.array([names.index(r["label"]) for r in rows])
    assert m["sen"] == pytest.approx(recall_score(y == covid, want == covid))
    assert m["acc"] == pytest.approx(accuracy_score(y, want))
    record = _json(out / "metrics.json")
    assert record["threshold"] == 0.05 and record["decision"].startswith("COVID where P(COVID)")
    got = predict(PredictConfig(model=str(run), inputs=tuple(str(ensure_synthetic() / r["path"])
                                                             for r in rows),
                                out_csv=str(tmp_path / "p.csv"), device="cpu", threshold=0.05))
    assert [r["prediction"] for r in got] == [r["prediction"] for r in rows]
    with pytest.raises(SystemExit, match="--threshold must be between 0 and 1"):
        evaluate(EvaluateConfig(model=str(run), data=data, threshold=1.0))


def test_evaluate_refuses_unknown_classes(syn_runs, tmp_path):
    src = sorted((ensure_synthetic() / "COVID").glob("*.png"))
    for cls in ("COVID", "Martian"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for f in src[:2]:
            shutil.copy(f, tmp_path / "d" / cls / f.name)
    with pytest.raises(DataError, match="'Martian'"):
        evaluate(EvaluateConfig(model=str(syn_runs[0.1]),
                                data=DataConfig(path=str(tmp_path / "d"))))


@needs_shared
def test_cxr_small_from_encoder_and_from_scratch_beat_chance(tmp_path):
    encoder = pretrain(_pt(tmp_path, "enc", CXR_SMALL))
    runs = {"encoder": finetune(_ft(tmp_path, "ft-enc", CXR_SMALL, encoder=str(encoder), epochs=3)),
            "random": finetune(_ft(tmp_path, "ft-rand", CXR_SMALL, epochs=3))}
    for start, run in runs.items():
        rows = _rows(run)
        split, sub = _json(run / "split.json"), _json(run / "subset.json")
        assert len(split["test"]) == 120 and not set(sub["train"]) & set(split["test"])
        acc = [float(r["acc"]) for r in rows]
        assert max(acc) > ACC_BAR and acc[-1] > ACC_BAR, (start, acc)  # chance is 0.25
    m = evaluate(EvaluateConfig(model=str(runs["random"]), data=DataConfig(path=str(CXR_SMALL)),
                                split="test", device="cpu"))
    assert m["acc"] == pytest.approx(float(_rows(runs["random"])[-1]["acc"]), abs=1e-6)



def _copy_synthetic(dst, drop: str | None = None):
    src = ensure_synthetic()
    for f in sorted(src.rglob("*.png")):
        rel = f.relative_to(src).as_posix()
        if rel != drop:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / rel)
    return dst


def test_an_encoder_that_saw_this_runs_test_images_is_refused(syn_encoder, tmp_path):
    """One image fewer reshuffles its class's split, so images the encoder pretrained on land
    in the test split. The oracle is computed here from the two runs' own split lists."""
    first = _json(syn_encoder / "split.json")
    drop = sorted(first["test"])[0]  # a test image: the encoder never saw it
    data = _copy_synthetic(tmp_path / "d", drop=drop)
    from sstl.engine.data.dataset import load_dataset

    ds = load_dataset(DataConfig(path=str(data)), need_labels=True, log=lambda m: None)
    now_test = {ds.records[i].rel for i in ds.test_idx}
    seen = now_test & set(first["train"])
    assert seen  # the precondition: this data change does move pretraining images into test
    with pytest.raises(SystemExit, match=f"pretrained on {len(seen)} of this run's "
                                         f"{len(now_test)} test images"):
        finetune(_ft(tmp_path, "leak", data, encoder=str(syn_encoder)))
    assert not (tmp_path / "leak").exists()


def test_evaluate_leaves_out_the_images_the_model_learned_from(syn_runs, tmp_path):
    run = syn_runs[0.1]
    trained = set(_json(run / "subset.json")["train"])
    m = evaluate(EvaluateConfig(model=str(run), device="cpu", out=str(tmp_path / "ev")))
    got = _json(tmp_path / "ev" / "metrics.json")
    assert got["left_out_trained_on"] == len(trained) and got["n"] == 256 - len(trained)
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        scored = {r["path"] for r in csv.DictReader(fh)}
    assert len(scored) == got["n"] and not scored & trained
    assert m["acc"] == got["metrics"]["acc"]


def test_sidecars_of_older_versions_still_name_their_images(tmp_path):
    """Sidecars written before content digests listed a hash of path and size (12 hex
    digits); those images must still count as learned. Oracle: the old formula, written out."""
    import hashlib
    import os

    from sstl.engine.data.dataset import load_dataset

    ds = load_dataset(DataConfig(), need_labels=True, log=lambda m: None)
    old = [hashlib.blake2b(f"{ds.records[i].rel}\0{os.path.getsize(ds.records[i].path)}".encode(),
                           digest_size=6).hexdigest() for i in ds.test_idx[:3]]
    new = ds.image_ids(ds.test_idx[3:5])
    seen = ds.learned(old + new, ds.test_idx)
    assert seen[:5].all() and not seen[5:].any()


def test_what_a_start_learned_follows_it_through_every_stage(tmp_path, capsys):
    """Stage 1 run on X-rays (here the demo set, split 1), given to finetune as --encoder or
    --init, or carried through a pretraining that starts from it: every route is refused when
    its images include this run's test split (split 0). Oracle: stage 1's own split.json."""
    from sstl.engine.config import FinetuneAugment, Runtime, SupervisedConfig
    from sstl.engine.supervised import supervised

    s1 = supervised(SupervisedConfig(
        runtime=Runtime(device="cpu", compile=False, out=str(tmp_path), name="s1"),
        data=DataConfig(cache_size=64, split_seed=1), arch="resnet18", init="random", epochs=1,
        batch_size=32, augment=FinetuneAugment(size=32)))
    from sstl.engine.data.dataset import load_dataset

    ds = load_dataset(DataConfig(cache_size=64), need_labels=True, log=lambda m: None)
    seen = len({ds.records[i].rel for i in ds.test_idx} & set(_json(s1 / "split.json")["train"]))
    assert seen  # the precondition: stage 1 trained on some of split 0's test images
    enc = s1 / "encoder.safetensors"
    for kw, flag in (({"encoder": str(enc)}, "--encoder"), ({"init": str(enc)}, "--init")):
        with pytest.raises(SystemExit, match=f"{flag} .* was pretrained on {seen} of this run's"):
            finetune(_ft(tmp_path, f"ft{flag}", cache_size=64, **kw))
    p = pretrain(_pt(tmp_path, "p", init=str(enc)))  # its own split is 0: no leak of its own
    with pytest.raises(SystemExit, match="pretrained on .* test images. The weights it "
                                         "started from .*s1/encoder.safetensors"):
        finetune(_ft(tmp_path, "ft-p", cache_size=64, encoder=str(p)))


def test_a_split_all_start_is_a_warning_through_every_stage(tmp_path, capsys):
    """An encoder pretrained with --split all has seen the test images without labels:
    finetune warns (it does not refuse) and leaves them out of the model's `trained_on`.
    An encoder that started from it (--init) carries the same warning, not a refusal."""
    a = pretrain(_pt(tmp_path, "a", split="all"))
    assert json.loads((a / "encoder.json").read_text())["pretrain_split"] == "all"
    b = pretrain(_pt(tmp_path, "b", init=str(a / "encoder.safetensors")))
    assert json.loads((b / "encoder.json").read_text())["pretrain_split"] == "all"
    for enc, name in ((a, "fa"), (b, "fb")):
        capsys.readouterr()
        run = finetune(_ft(tmp_path, name, encoder=str(enc)))
        assert "pretrained with --split all" in capsys.readouterr().err
        meta, config = _json(run / "model.json"), _json(run / "config.json")
        # Its labelled images only: the test images the encoder saw unlabelled are not listed
        # (sstl evaluate --split test would otherwise have nothing left to score)...
        assert len(meta["trained_on"]) == config["n_train"] and config["n_test"] > 0
        # ... so evaluate says what it cannot leave out.
        capsys.readouterr()
        evaluate(EvaluateConfig(model=str(run), device="cpu"))
        assert "encoder was pretrained with --split all" in capsys.readouterr().err
