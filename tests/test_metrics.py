"""The paper's metrics. Oracles: confusion matrices worked out by hand, sklearn, numpy."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sstl.engine.metrics import (MetricWarning, auc_score, best_epoch, classification_metrics,
                                 confusion, harmonic_mean, summarize)

NAMES = ["Alpha", "COVID", "Beta"]
# 10 test images; positive class COVID (index 1); class Beta (2) is never predicted.
Y_TRUE = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 1, 0, 1, 1, 0, 1, 1, 0, 0]


def _probs(y_pred, k=3, seed=0):
    """Probabilities whose argmax is y_pred (the metrics never see logits)."""
    p = np.random.default_rng(seed).uniform(0.0, 0.5, (len(y_pred), k))
    p[np.arange(len(y_pred)), y_pred] = 1.0
    return p / p.sum(1, keepdims=True)


def test_hand_computed_confusion_and_metrics():
    cm = confusion(Y_TRUE, Y_PRED, 3)
    # rows: true Alpha, COVID, Beta; columns: predicted. Worked out by hand.
    np.testing.assert_array_equal(cm, [[2, 1, 0], [1, 3, 0], [2, 1, 0]])
    m = classification_metrics(Y_TRUE, Y_PRED, _probs(Y_PRED), NAMES, "COVID")
    # COVID vs rest: TP 3, FN 1, FP 2 (images 1 and 7), TN 4.
    assert m["sen"] == pytest.approx(3 / 4)
    assert m["spe"] == pytest.approx(4 / 6)
    assert m["hm"] == pytest.approx(12 / 17)  # 2 (3/4)(2/3) / (3/4 + 2/3)
    assert m["acc"] == pytest.approx(5 / 10)
    assert m["recall/Alpha"] == pytest.approx(2 / 3)
    assert m["recall/COVID"] == pytest.approx(3 / 4)
    assert m["recall/Beta"] == 0.0  # never predicted: recall 0, no crash


def test_class_absent_from_test_set_has_nan_recall():
    names = NAMES + ["Gamma"]  # a fourth class with no test image
    m = classification_metrics(Y_TRUE, Y_PRED, _probs(Y_PRED, k=4), names, "COVID")
    assert math.isnan(m["recall/Gamma"])
    assert m["sen"] == pytest.approx(3 / 4) and m["acc"] == pytest.approx(0.5)
    assert confusion(Y_TRUE, Y_PRED, 4).shape == (4, 4)


def test_harmonic_mean_formula():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(1.0, 1.0) == 1.0
    assert harmonic_mean(0.0, 0.0) == 0.0  # not a division by zero
    assert harmonic_mean(0.0, 0.9) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 0.5))


def test_auc_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 4, 200)
        logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = classification_metrics(y, p.argmax(1), p, ["a", "b", "COVID", "d"], "COVID")
        assert m["auc"] == pytest.approx(roc_auc_score(y == 2, p[:, 2]), abs=1e-12)


def test_one_class_test_set_gives_nan_auc_with_a_warning():
    y = np.ones(6, dtype=int)  # every test image is COVID
    pred = np.array([1, 1, 0, 1, 2, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = classification_metrics(y, pred, _probs(pred), NAMES, "COVID")
    said = " ".join(str(w.message) for w in caught if w.category is MetricWarning)
    assert "AUC is undefined" in said and "specificity is NaN" in said
    assert math.isnan(m["auc"]) and math.isnan(m["spe"]) and math.isnan(m["hm"])
    assert m["sen"] == pytest.approx(4 / 6) and m["acc"] == pytest.approx(4 / 6)
    with pytest.warns(MetricWarning):
        assert math.isnan(auc_score(np.zeros(3, bool), np.zeros(3)))


def test_no_warning_when_everything_is_defined():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classification_metrics(Y_TRUE, Y_PRED, _probs(Y_PRED), NAMES, "COVID")


def _rows(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"epoch": e, "hm": float(v), "acc": float(a)}
            for e, (v, a) in enumerate(rng.uniform(0, 1, (n, 2)))]


def test_summary_is_mean_and_std_of_the_last_epochs():
    rows = _rows(14)
    s = summarize(rows, ["hm", "acc"], last=10)
    hm = np.array([r["hm"] for r in rows[-10:]])
    assert s["hm"]["mean"] == pytest.approx(hm.mean(), abs=1e-15)
    assert s["hm"]["std"] == pytest.approx(hm.std(), abs=1e-15)  # population std (ddof=0)
    few = _rows(4)  # fewer epochs than 10: all of them
    s = summarize(few, ["acc"], last=10)
    assert s["acc"]["mean"] == pytest.approx(np.mean([r["acc"] for r in few]), abs=1e-15)
    # metrics.csv gives strings: they are read as numbers.
    s = summarize([{"acc": "0.5"}, {"acc": "1.0"}], ["acc"], last=10)
    assert s["acc"] == {"mean": 0.75, "std": 0.25}


def test_best_epoch_by_hm_then_by_accuracy():
    rows = [{"hm": 0.5, "acc": 0.9}, {"hm": 0.7, "acc": 0.1}, {"hm": 0.7, "acc": 0.2}]
    assert best_epoch(rows) == (1, "hm")  # the first of equals
    nan = float("nan")
    assert best_epoch([{"hm": nan, "acc": 0.3}, {"hm": nan, "acc": 0.6}]) == (1, "acc")


def test_decide_with_a_threshold_is_the_operating_point_rule():
    """Oracle: the rule written out per image. Without a threshold, the argmax (the paper's);
    with one, the positive class exactly where its probability reaches it, else the most
    probable other class; a lower threshold never loses a positive call (more sensitivity)."""
    from sstl.engine.metrics import decide, decision_rule

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=400)
    probs[0] = [0.45, 0.30, 0.25]  # argmax Alpha, but P(COVID) 0.30 reaches 0.3
    pos = NAMES.index("COVID")
    np.testing.assert_array_equal(decide(probs, pos), probs.argmax(1))
    for t in (0.1, 0.3, 0.5, 0.9):
        want = [pos if p[pos] >= t else max((k for k in range(3) if k != pos), key=lambda k: p[k])
                for p in probs]
        np.testing.assert_array_equal(decide(probs, pos, t), want)
    assert decide(probs, pos, 0.3)[0] == pos and decide(probs, pos)[0] == 0
    assert set(np.flatnonzero(decide(probs, pos, 0.5) == pos)) <= \
        set(np.flatnonzero(decide(probs, pos, 0.2) == pos))
    assert decision_rule("COVID", 0.25) == ("COVID where P(COVID) >= 0.25, else the most "
                                            "probable other class")
