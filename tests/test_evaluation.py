"""Figures, bootstrap intervals and the model card (engine/evaluation.py)."""
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sstl.engine.evaluation import (bootstrap_ci, card_fields, curves_png, draw_figures,
                                    resample_metrics, roc_figure, write_model_card)
from sstl.engine.metrics import METRICS, MetricWarning, classification_metrics

NAMES = ["COVID", "Normal", "Pneumonia"]


def fake_test_set(n: int, seed: int = 0, skill: float = 1.5):
    """n images of 3 classes; probabilities that favour the true class by `skill` logits."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += skill
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def point(y, p):
    return classification_metrics(y, p.argmax(1), p, NAMES, "COVID")


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    y, p = fake_test_set(120)
    ci = bootstrap_ci(y, p, NAMES, "COVID", n=200, seed=3)
    assert set(ci) == set(METRICS)
    m = point(y, p)
    for k in METRICS:
        lo, hi = ci[k]
        assert lo <= m[k] <= hi and lo < hi, (k, lo, m[k], hi)
    assert bootstrap_ci(y, p, NAMES, "COVID", n=200, seed=3) == ci
    assert bootstrap_ci(y, p, NAMES, "COVID", n=200, seed=4) != ci


@pytest.mark.parametrize("n_images, rounding", [(120, None), (9, 1), (706, 2)])
def test_resample_metrics_equal_scikit_learn_on_every_resample(n_images, rounding):
    """The vectorised bootstrap against classification_metrics (scikit-learn) resample by
    resample: rounded scores make ties for the AUC, and 9 images give resamples with no
    positive or no negative image (NaN in the same places)."""
    y, p = fake_test_set(n_images, seed=n_images)
    if rounding is not None:
        p = np.round(p, rounding)
    idx = np.random.default_rng(0).integers(0, n_images, size=(300, n_images))
    got = resample_metrics(y, p, 0, idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        want = [point(y[i], p[i]) for i in idx]
    for k in METRICS:
        ref = np.array([w[k] for w in want])
        np.testing.assert_allclose(got[k], ref, rtol=1e-12, atol=1e-12, err_msg=k)
    if n_images == 9:
        assert np.isnan(got["auc"]).any() and not np.isnan(got["auc"]).all()


def test_bootstrap_ci_narrows_with_more_test_images():
    small = bootstrap_ci(*fake_test_set(40, seed=1), NAMES, "COVID", n=200)
    large = bootstrap_ci(*fake_test_set(640, seed=1), NAMES, "COVID", n=200)
    for k in METRICS:
        w_small, w_large = small[k][1] - small[k][0], large[k][1] - large[k][0]
        assert w_large < 0.6 * w_small, (k, w_small, w_large)  # 1/sqrt(16) = 0.25 in theory


def test_bootstrap_ci_undefined_metric_is_nan():
    y, p = fake_test_set(30)
    y[:] = 1  # no COVID image at all: Sen and AUC undefined in every resample
    ci = bootstrap_ci(y, p, NAMES, "COVID", n=20)
    assert np.isnan(ci["sen"]).all() and np.isnan(ci["auc"]).all()
    assert not np.isnan(ci["acc"]).any()


def test_figures_are_written(tmp_path):
    y, p = fake_test_set(60)
    draw_figures(tmp_path, y, p, NAMES, "COVID", "60 images")
    for name in ("confusion_matrix.png", "roc.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and min(im.size) > 300
        assert (tmp_path / name).stat().st_size > 10_000
    rows = [{"epoch": str(e), "loss": str(1 / (e + 1)), **{k: "0.5" for k in METRICS}}
            for e in range(4)]
    curves_png(rows, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size[0] > 600 and im.size[0] > im.size[1]


def test_figures_survive_a_test_set_without_positives(tmp_path):
    y, p = fake_test_set(20)
    y[:] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        draw_figures(tmp_path, y, p, NAMES, "COVID", "no positives")
    assert (tmp_path / "roc.png").stat().st_size > 5_000


def test_roc_operating_point_is_the_argmax_decision():
    y, p = fake_test_set(80, seed=5, skill=0.8)
    pred = p.argmax(1)
    tp = np.sum((pred == 0) & (y == 0))
    fp = np.sum((pred == 0) & (y != 0))
    fpr, tpr = fp / np.sum(y != 0), tp / np.sum(y == 0)
    assert 0 < fpr < 1 and 0 < tpr < 1  # a point inside the square, not a corner
    fig = roc_figure(y, p, NAMES, "COVID", "test")
    marked = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("operating point")]
    assert len(marked) == 1
    assert marked[0].get_xdata()[0] == pytest.approx(fpr)
    assert marked[0].get_ydata()[0] == pytest.approx(tpr)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sum("AUC" in t for t in labels) == 3  # COVID vs rest and both other classes
    # With --threshold, the marker is that operating point's, and says so.
    from sstl.engine.metrics import decide

    said = decide(p, 0, 0.2)
    fig = roc_figure(y, p, NAMES, "COVID", "test", said, 0.2)
    [marked] = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("operating point")]
    assert marked.get_label().startswith("operating point (P(COVID) >= 0.2)")
    assert marked.get_xdata()[0] == pytest.approx(np.sum((said == 0) & (y != 0)) / np.sum(y != 0))
    assert marked.get_ydata()[0] == pytest.approx(np.sum((said == 0) & (y == 0)) / np.sum(y == 0))
    assert marked.get_ydata()[0] >= tpr  # a lower bar: more of COVID found


def card_info():
    return {"arch": "resnet18", "start": "runs/pretrain-x/encoder.safetensors", "fraction": 0.1,
            "epochs": 30, "image_size": 224, "class_names": NAMES, "positive_class": "COVID",
            "counts": {"COVID": {"train": 101, "test": 26}, "Normal": {"train": 202, "test": 51},
                       "Pneumonia": {"train": 303, "test": 77}},
            "data": "/data/covid-radiography", "synthetic_data": False,
            "last_epochs": {k: {"mean": 0.8123, "std": 0.0345} for k in METRICS},
            "last_n": 10, "final": {"sen": 0.9177, "spe": 0.8866, "hm": 0.9019, "auc": 0.9712,
                                    "acc": 0.8555},
            "final_epoch": 29, "final_ci": {k: (0.7011, 0.9388) for k in METRICS},
            "ci_n": 1000, "run": "finetune-resnet18-x"}


def test_model_card_holds_the_numbers_passed_in(tmp_path):
    path = write_model_card(tmp_path, card_info())
    assert path == tmp_path / "MODEL_CARD.md"
    text = path.read_text()
    for s in ("0.8123 ± 0.0345", "0.9177", "0.9712", "[0.7011, 0.9388]", "| COVID | 101 | 26 |",
              "| total | 606 | 154 |", "resnet18", "0.1", "224", "/data/covid-radiography",
              "not a medical device", "Togo", "Haseyama", "Self-supervised transfer learning",
              "same distribution", "learn the source instead of the disease", "epoch 29",
              "1000 resamples"):
        assert s.lower() in text.lower(), s
    fields = card_fields(card_info())
    assert fields["metrics"]["auc"] == {"mean": 0.8123, "std": 0.0345, "final": 0.9712,
                                        "ci": [0.7011, 0.9388]}
    assert fields["training_data"]["counts"]["Normal"] == {"train": 202, "test": 51}
    import json
    json.dumps(fields)  # model.json can hold it


def test_a_boundary_interval_is_marked_in_the_card(tmp_path):
    """A specificity of 1 gives the percentile bootstrap [1, 1]: marked, and explained."""
    info = card_info()
    info["final_ci"] = {**info["final_ci"], "spe": (1.0, 1.0)}
    text = write_model_card(tmp_path, info).read_text()
    assert "| [1.0000, 1.0000] * |" in text and "[0.7011, 0.9388] *" not in text
    assert "An interval at 0 or 1 (marked *)" in text


def test_model_card_says_when_the_data_was_synthetic(tmp_path):
    info = {**card_info(), "synthetic_data": True}
    text = write_model_card(tmp_path, info).read_text()
    assert "synthetic" in text.lower() and "/data/covid-radiography" not in text


def test_bootstrap_by_patient_equals_the_image_bootstrap_of_one_image_per_patient():
    """Each of 60 patients has 4 identical images. Resampling patients must give exactly the
    intervals of resampling the 60 distinct images (every metric is a ratio of counts, and a
    patient's 4 copies scale its counts by 4); resampling the 240 images one by one treats
    copies as independent and gives narrower intervals."""
    y, p = fake_test_set(60, seed=5)
    y4, p4 = np.repeat(y, 4), np.repeat(p, 4, axis=0)
    patients = np.repeat([f"patient-{i}" for i in range(60)], 4)
    by_patient = bootstrap_ci(y4, p4, NAMES, "COVID", n=300, seed=2, groups=patients)
    distinct = bootstrap_ci(y, p, NAMES, "COVID", n=300, seed=2)
    for k in METRICS:
        assert by_patient[k] == pytest.approx(distinct[k], abs=1e-12), k
    by_image = bootstrap_ci(y4, p4, NAMES, "COVID", n=300, seed=2)
    width = {k: (ci[k][1] - ci[k][0]) for ci in (by_image,) for k in METRICS}
    assert all(width[k] < 0.7 * (distinct[k][1] - distinct[k][0]) for k in METRICS), width
    singles = bootstrap_ci(y, p, NAMES, "COVID", n=300, seed=2, groups=[str(i) for i in range(60)])
    assert singles == distinct  # one image per group is the image bootstrap, draw for draw


def test_a_full_disk_while_writing_figures_or_the_card_is_one_line_and_no_partial_file(
        tmp_path, monkeypatch):
    """The figures and the card go through atomic_write like every other output: a disk that
    fills mid-write is one line (WriteError, a SystemExit), the old file stays whole."""
    import errno
    import os

    from matplotlib.figure import Figure

    from sstl.engine.io import WriteError

    write_model_card(tmp_path, card_info())
    before = (tmp_path / "MODEL_CARD.md").read_text()

    def half(self, fname, *a, **k):
        with open(fname, "wb") as fh:
            fh.write(b"half a png")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, "savefig", half)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(WriteError, match="No space left on device"):
        draw_figures(tmp_path, y, np.eye(3)[y], NAMES, "COVID", "6 images")
    monkeypatch.setattr(Path, "write_text", lambda self, text: half(None, self))
    with pytest.raises(WriteError, match="MODEL_CARD.md"):
        write_model_card(tmp_path, card_info())
    monkeypatch.undo()
    assert (tmp_path / "MODEL_CARD.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MODEL_CARD.md"]
