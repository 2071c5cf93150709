"""The paper's metrics (Table 2): COVID-vs-rest Sen, Spe, their harmonic mean, AUC, and Acc.

Everything is computed with scikit-learn from three arrays: the true class index of each
test image, the predicted class index (argmax, or `decide`'s operating point) and the
softmax probabilities (N x K).
  Sen  recall of the positive class: TP / (TP + FN), the positive class against the rest
  Spe  recall of the rest: TN / (TN + FP)
  HM   2 Sen Spe / (Sen + Spe), the harmonic mean the paper ranks methods by
  AUC  area under the ROC of the positive class's softmax probability, positive vs rest
  Acc  multi-class accuracy over all K classes
plus the recall of every class. An undefined value (no positive image in the test set, or
only one class in it) is NaN with a warning, never an exception: a 1% subset of a small set
must still produce a row.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score

METRICS = ("sen", "spe", "hm", "auc", "acc")  # the columns of Table 2, in its order
NAMES = {"sen": "Sensitivity", "spe": "Specificity", "hm": "HM", "auc": "AUC", "acc": "Accuracy"}


def display_name(key: str) -> str:
    """A metric's name in tables and cards: the paper's, or 'recall COVID' for recall/COVID."""
    return NAMES.get(key, key.replace("recall/", "recall "))


class MetricWarning(UserWarning):
    """A metric is undefined for this test set (NaN is reported instead)."""


def harmonic_mean(sen: float, spe: float) -> float:
    """2ab / (a + b); 0 when both are 0 (nothing found, everything flagged); NaN propagates."""
    if np.isnan(sen) or np.isnan(spe):
        return float("nan")
    return 0.0 if sen + spe == 0 else 2 * sen * spe / (sen + spe)


def auc_score(is_pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the positive images; NaN (and a warning) without both kinds."""
    if is_pos.all() or not is_pos.any():
        warnings.warn("AUC is undefined: the test set holds only one side of positive-vs-rest; "
                      "reporting NaN", MetricWarning, stacklevel=2)
        return float("nan")
    return float(roc_auc_score(is_pos, score))


def _recall(y_true, y_pred, **kw) -> np.ndarray:
    # zero_division=nan: a class with no test image has no recall, which is not 0.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns per call; we warn once, below
        return np.atleast_1d(recall_score(y_true, y_pred, zero_division=np.nan, **kw))


def classification_metrics(y_true, y_pred, probs, class_names: list[str],
                           positive: str) -> dict[str, float]:
    """One evaluation's metrics: Table 2's five, then `recall/<class>` for every class."""
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs)
    pos = class_names.index(positive)
    is_pos, said_pos = y_true == pos, y_pred == pos
    # Positive vs rest as a binary problem: Sen is the recall of 1, Spe the recall of 0.
    sen, spe = (float(r) for r in _recall(is_pos, said_pos, labels=[True, False], average=None))
    if np.isnan(sen) or np.isnan(spe):
        missing = "positive" if np.isnan(sen) else "negative"
        warnings.warn(f"the test set has no {missing} ({positive!r} vs rest) image: "
                      f"{'sensitivity' if np.isnan(sen) else 'specificity'} is NaN",
                      MetricWarning, stacklevel=2)
    out = {"sen": sen, "spe": spe, "hm": harmonic_mean(sen, spe),
           "auc": auc_score(is_pos, probs[:, pos]), "acc": float(accuracy_score(y_true, y_pred))}
    per_class = _recall(y_true, y_pred, labels=list(range(len(class_names))), average=None)
    out.update({f"recall/{c}": float(r) for c, r in zip(class_names, per_class)})
    return out


def decide(probs, pos: int, threshold: float | None = None) -> np.ndarray:
    """Each image's predicted class: the most probable (the paper's rule), or, with a
    `threshold` on the positive class's probability, the positive class wherever it reaches
    it and the most probable other class elsewhere: an operating point chosen for the
    clinic (a low threshold for screening: more sensitivity, less specificity)."""
    probs = np.asarray(probs)
    if threshold is None:
        return probs.argmax(1)
    others = probs.copy()
    others[:, pos] = -np.inf
    return np.where(probs[:, pos] >= threshold, pos, others.argmax(1))


def decision_rule(positive: str, threshold: float | None = None) -> str:
    """The rule `decide` applies, in words, for every output that reports a decision."""
    if threshold is None:
        return "the most probable class"
    return (f"{positive} where P({positive}) >= {threshold:g}, else the most probable other "
            "class")


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted; absent classes give zero rows."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def summarize(rows: list[dict], keys, last: int) -> dict:
    """Mean and std of each key over the last `last` rows (all rows if fewer): Table 2's form.

    std is the population std (numpy's default, ddof=0): it describes the spread of these
    epochs, and stays defined for a single epoch. NaN in any epoch makes the summary NaN.
    """
    tail = rows[-last:]
    out = {}
    for k in keys:
        v = np.array([float(r[k]) for r in tail], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std())}
    return out


def best_epoch(rows: list[dict], by: str = "hm") -> tuple[int, str]:
    """Index of the best row by `by` (first of equals); by accuracy when `by` is NaN everywhere."""
    v = np.array([float(r[by]) for r in rows], dtype=np.float64)
    if np.isnan(v).all():
        by = "acc"
        v = np.array([float(r[by]) for r in rows], dtype=np.float64)
    return int(np.nanargmax(v)), by
