"""What a reader of a run looks at: figures, bootstrap confidence intervals, the model card.

  draw_figures    confusion_matrix.png and roc.png (positive vs rest, the argmax operating
                  point, every class one-vs-rest)
  curves_png      training curves from metrics.csv rows: loss, and HM / AUC / Acc per epoch
  bootstrap_ci    percentile bootstrap intervals of the paper's metrics, resampling test images
                  or whole patients (groups)
  write_model_card / card_fields   MODEL_CARD.md, and the same facts as a dict for model.json
Figures are drawn on matplotlib's Agg canvas without pyplot: no display, no global state.
"""
from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .io import atomic_write
from .metrics import METRICS, NAMES, confusion, display_name

CITATION = ('G. Li, R. Togo, T. Ogawa, M. Haseyama, "Self-supervised transfer learning for '
            'COVID-19 detection from chest X-ray images"')
CURVE_METRICS = ("hm", "auc", "acc")  # the ones curves_png draws per epoch


def new_figure(figsize, cols: int = 1, dpi: float | None = None):
    """A matplotlib Figure on the Agg canvas, without pyplot: no global backend, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols)


# --- figures ---------------------------------------------------------------------------------

def draw_figures(folder, y_true, probs, class_names: list[str], positive: str, what: str,
                 said=None, threshold: float | None = None) -> None:
    """confusion_matrix.png (Figure 4's form) and roc.png into `folder`; `what`, in their
    titles, says what they show (evaluate: the model, the data and the images). Both show
    the decision `said` (each image's predicted class, made with `threshold`: metrics.decide;
    default: the most probable class)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    said = probs.argmax(1) if said is None else np.asarray(said)
    for name, fig in (("confusion_matrix.png", confusion_figure(y_true, said, class_names, what)),
                      ("roc.png", roc_figure(y_true, probs, class_names, positive, what,
                                             said, threshold))):
        atomic_write(folder / name, lambda tmp, fig=fig: fig.savefig(
            tmp, format="png", dpi=120, bbox_inches="tight"))


def confusion_figure(y_true, said, class_names: list[str], what: str):
    """Counts and row-normalised % per cell; rows are the true class, columns the prediction
    (`said`: each image's predicted class)."""
    cm = confusion(y_true, np.asarray(said), len(class_names))
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(class_names)
    fig, ax = new_figure((1.6 * k + 2, 1.4 * k + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            pct = f"{100 * share[i, j]:.1f}%" if rows[i, 0] else "-"
            ax.text(j, i, f"{cm[i, j]}\n{pct}", ha="center", va="center",
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(figure_title("Confusion matrix", what))
    return fig


def figure_title(kind: str, what: str) -> str:
    """A figure's title, wrapped: evaluate's `what` names a model and a data set, which can
    be wider than the plot. Names stay whole (ft-resnet18 is not cut at its hyphen)."""
    return textwrap.fill(f"{kind}, {what}", 60, break_on_hyphens=False, break_long_words=False)


def operating_point(y_true, said, pos: int) -> tuple[float, float]:
    """(FPR, TPR) of the model's decision (`said`: each image's predicted class) for class
    `pos` against the rest."""
    y_true, said = np.asarray(y_true) == pos, np.asarray(said) == pos
    neg = (~y_true).sum()
    fpr = (said & ~y_true).sum() / neg if neg else float("nan")
    tpr = (said & y_true).sum() / y_true.sum() if y_true.any() else float("nan")
    return float(fpr), float(tpr)


def _one_vs_rest(is_pos: np.ndarray, score: np.ndarray):
    """(fpr, tpr, auc) or None when the test set lacks one side (the ROC is undefined)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if is_pos.all() or not is_pos.any():
        return None
    fpr, tpr, _ = roc_curve(is_pos, score)
    return fpr, tpr, float(roc_auc_score(is_pos, score))


def roc_figure(y_true, probs, class_names: list[str], positive: str, what: str,
               said=None, threshold: float | None = None):
    """The positive-vs-rest ROC with the decision's operating point (`said`, made with
    `threshold`; default: the most probable class), and each class one-vs-rest."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    pos = class_names.index(positive)
    said = probs.argmax(1) if said is None else said
    fig, ax = new_figure((6.4, 6))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    others = [k for k in range(len(class_names)) if k != pos]
    for colour, k in enumerate(others, start=1):  # C0 is the positive class's
        curve = _one_vs_rest(y_true == k, probs[:, k])
        if curve:
            ax.plot(curve[0], curve[1], lw=1, ls="--", alpha=0.7, color=f"C{colour}",
                    label=f"{class_names[k]} vs rest, AUC {curve[2]:.3f}")
    curve = _one_vs_rest(y_true == pos, probs[:, pos])
    if curve:
        ax.plot(curve[0], curve[1], lw=2.5, color="C0",
                label=f"{positive} vs rest, AUC {curve[2]:.4f}")
    else:
        ax.plot([], [], color="C0", label=f"{positive} vs rest: AUC undefined (one side only)")
    fpr, tpr = operating_point(y_true, said, pos)
    if not (np.isnan(fpr) or np.isnan(tpr)):
        rule = "argmax" if threshold is None else f"P({positive}) >= {threshold:g}"
        ax.plot([fpr], [tpr], "o", ms=9, color="C3",
                label=f"operating point ({rule}): FPR {fpr:.3f}, TPR {tpr:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=figure_title("ROC", what))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def curves_png(rows: list[dict], path) -> None:
    """Training curves from metrics.csv rows: the loss, and HM / AUC / Acc on the test split."""
    epochs = np.array([int(float(r["epoch"])) + 1 for r in rows])  # metrics.csv counts from 0
    col = lambda k: np.array([float(r.get(k, "nan") or "nan") for r in rows])  # noqa: E731
    fig, (left, right) = new_figure((11, 4), cols=2)
    left.plot(epochs, col("loss"), marker=".", color="C3")
    left.set(xlabel="epoch", ylabel="training loss", title="Loss")
    for k in CURVE_METRICS:
        right.plot(epochs, col(k), marker=".", label=NAMES[k])
    right.set(xlabel="epoch", ylabel="test split", title="HM, AUC, Accuracy", ylim=(0, 1.02))
    right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


# --- uncertainty ------------------------------------------------------------------------------

def bootstrap_ci(y_true, probs, class_names: list[str], positive: str, n: int,
                 seed: int = 0, level: float = 0.95,
                 groups=None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric in METRICS, resampling test images, or
    whole groups (patients) when `groups` (one per image) is given.

    Images of one patient are not independent draws: resampled one by one, they give
    intervals that are too narrow. Each of `n` resamples draws as many groups as there are,
    with replacement, and takes every image of each draw (a seeded NumPy Generator: the same
    seed gives the same intervals; one image per group is the image bootstrap, draw for
    draw). A resample where a metric is undefined (no positive image, say) is left out of
    that metric's percentiles; a metric undefined in every resample gets (nan, nan). The
    metrics of all resamples are computed at once, equal to classification_metrics on each.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    gid = np.arange(len(y_true)) if groups is None else _first_seen_ids(groups)
    n_groups = int(gid.max()) + 1 if len(gid) else 0
    draws_g = np.random.default_rng(seed).integers(0, n_groups, size=(n, n_groups))
    counts = _row_counts(draws_g, n_groups)[:, gid]  # an image counts as often as its group
    draws = weighted_metrics(y_true, probs, class_names.index(positive), counts)
    tail = 100 * (1 - level) / 2
    out = {}
    for k in METRICS:
        v = draws[k][~np.isnan(draws[k])]
        out[k] = ((float("nan"),) * 2 if not len(v)
                  else tuple(float(x) for x in np.percentile(v, [tail, 100 - tail])))
    return out


def resample_metrics(y_true: np.ndarray, probs: np.ndarray, pos: int,
                     idx: np.ndarray) -> dict[str, np.ndarray]:
    """METRICS of every resample (row of `idx`, indices into the test images), vectorised:
    a resample is a multiset of test images, so a row of counts (weighted_metrics)."""
    return weighted_metrics(y_true, probs, pos, _row_counts(idx, len(y_true)))


def _row_counts(idx: np.ndarray, size: int) -> np.ndarray:
    """(n, size): how often each of `size` items was drawn in each row of `idx`."""
    n = idx.shape[0]
    return np.bincount((idx + size * np.arange(n)[:, None]).ravel(),
                       minlength=n * size).reshape(n, size).astype(np.float64)


def _first_seen_ids(groups) -> np.ndarray:
    """Group index of each image, numbered in order of first appearance."""
    _, first, inverse = np.unique(np.asarray(groups, dtype=object).astype(str),
                                  return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def weighted_metrics(y_true: np.ndarray, probs: np.ndarray, pos: int,
                     counts: np.ndarray) -> dict[str, np.ndarray]:
    """METRICS of every row of `counts` (how often each test image is in that resample).

    Every metric is a weighted count: Sen, Spe and Acc directly, and the AUC as the
    Mann-Whitney statistic (ties count one half, as roc_auc_score's trapezoids do) over the
    images sorted once by score. Looping classification_metrics over 1,000 resamples took
    ~10 s per fine-tuning run; this takes milliseconds.
    """
    pred = probs.argmax(1)
    is_pos, said_pos = y_true == pos, pred == pos
    with np.errstate(invalid="ignore", divide="ignore"):
        n_pos, n_neg = counts @ is_pos, counts @ ~is_pos
        sen = (counts @ (is_pos & said_pos)) / n_pos
        spe = (counts @ (~is_pos & ~said_pos)) / n_neg
        hm = np.where(sen + spe == 0, 0.0, 2 * sen * spe / (sen + spe))
        acc = (counts @ (y_true == pred)) / counts.sum(1)
        # AUC: group equal scores; positives above a negative count 1, level with it 1/2.
        order = np.argsort(probs[:, pos], kind="stable")
        ranked = probs[order, pos]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one per score value
        w = counts[:, order]
        w_pos = np.add.reduceat(w * is_pos[order], starts, axis=1)
        w_neg = np.add.reduceat(w * ~is_pos[order], starts, axis=1)
        below = np.cumsum(w_neg, axis=1) - w_neg  # negatives scored strictly lower
        auc = (w_pos * (below + 0.5 * w_neg)).sum(1) / (n_pos * n_neg)
    undefined = (n_pos == 0) | (n_neg == 0)
    auc[undefined] = np.nan
    return {"sen": sen, "spe": spe, "hm": hm, "auc": auc, "acc": acc}


# --- model card -------------------------------------------------------------------------------

INTENDED_USE = ("Research only: reproducing and studying self-supervised transfer learning for "
                "chest X-ray classification. Not a medical device; not validated for diagnosis, "
                "triage or any clinical decision, and must not be used for them.")

LIMITATIONS = [
    "One data set: the model saw only its training images; scanners, hospitals, populations "
    "and acquisition protocols outside them may change its behaviour without warning.",
    "Where the classes come from different sources (public COVID-19 sets were often put "
    "together so: other hospitals, countries, file formats or image sizes per class), the "
    "model can learn the source instead of the disease, and a test split of the same sources "
    "rewards it; scores on another hospital's images (sstl evaluate) tell the two apart.",
    "The test split comes from the same distribution (and the same sources) as the training "
    "split, so the metrics are in-distribution; they are not an external validation.",
    "The labels are those of the data set, not a verified reference standard (e.g. RT-PCR).",
    "Images are reduced to grayscale squares of the stated size; the aspect ratio and "
    "DICOM metadata (view position, patient age, sex) are not used.",
    "The confidence intervals resample the test split only (its images, or its groups where "
    "images share one: patients, or near-duplicate images): they do not cover the variation "
    "between training runs (seeds), for which the mean ± std over the last epochs is a hint. "
    "An interval at 0 or 1 (marked *) is the percentile bootstrap's: at the boundary it "
    "shows no spread, though the value is uncertain.",
    "Softmax probabilities are not calibrated and are not a probability of disease.",
]


def card_fields(info: dict) -> dict:
    """The model card's facts as a JSON-ready dict (for model.json); see write_model_card."""
    names = list(info["class_names"])
    counts = info.get("counts", {})
    synthetic = bool(info.get("synthetic_data", False))
    final, ci = info.get("final", {}), info.get("final_ci", {})
    last = info.get("last_epochs", {})
    metrics = {}
    for k in (*METRICS, *(k for k in final if k.startswith("recall/"))):
        entry = {}
        if k in last:
            entry.update(mean=float(last[k]["mean"]), std=float(last[k]["std"]))
        if k in final:
            entry["final"] = float(final[k])
        if k in ci:
            entry["ci"] = [float(ci[k][0]), float(ci[k][1])]
        if entry:
            metrics[k] = entry
    return {
        "intended_use": INTENDED_USE,
        "training_data": {
            "source": "the embedded SYNTHETIC demo set" if synthetic else str(info.get("data", "")),
            "synthetic": synthetic, "class_names": names, "positive_class": info["positive_class"],
            "counts": {c: {"train": int(counts.get(c, {}).get("train", 0)),
                           "test": int(counts.get(c, {}).get("test", 0))} for c in names}},
        "protocol": {k: info.get(k) for k in ("arch", "start", "fraction", "n_train",
                                              "n_train_split", "epochs", "image_size")},
        "metrics": metrics,
        "metrics_note": (f"mean ± std over the last {info.get('last_n', '?')} epochs; final = "
                         f"epoch {info.get('final_epoch', '?')} (from 0, as in metrics.csv) with "
                         f"its {100 * info.get('ci_level', 0.95):.0f}% percentile bootstrap "
                         f"interval over {info.get('ci_n', '?')} resamples of the test "
                         f"{info.get('ci_unit', 'images')}"),
        "limitations": LIMITATIONS + list(info.get("limitations", [])),
        "citation": CITATION,
    }


def write_model_card(folder, info: dict) -> Path:
    """Write `folder`/MODEL_CARD.md and return its path.

    `info` keys (those marked * are required):
      arch*             backbone name, e.g. "resnet50"
      start*            where the encoder came from: a path to encoder.safetensors, "imagenet"
                        or "random"
      fraction*         share of the training split's labels asked for (0-1]
      n_train, n_train_split  images the fraction took, of the training split's
      epochs*           fine-tuning epochs run
      image_size*       side of the classifier's input in pixels
      class_names*      list of class names, in the model's order
      positive_class*   the class of Sen/Spe/HM/AUC
      counts*           {class: {"train": int, "test": int}} images per class and split
      data              the data root or manifest the model was trained on
      synthetic_data    True when trained on the embedded synthetic demo set
      last_epochs       {metric: {"mean": float, "std": float}} (summary.json's last_epochs)
      last_n            how many epochs last_epochs averages
      final             {metric: float} the final epoch's values (METRICS and recall/<class>)
      final_epoch       that epoch's number (from 0, as in metrics.csv)
      final_ci          {metric: (low, high)} from bootstrap_ci on the final epoch
      ci_level, ci_n    the interval's level (default 0.95) and number of resamples
      ci_unit           what was resampled: images (default) or groups (patients, duplicates)
      run               the run directory's name (the card's title)
      limitations       extra limitations, appended to the standard list
    The same facts, as a dict, come from card_fields(info).
    """
    f = card_fields(info)
    data, proto = f["training_data"], f["protocol"]
    lines = [f"# Model card: {info.get('run', 'sstl classifier')}", "",
             f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by sstl.", "",
             "## Intended use", "", f["intended_use"], "",
             "## Training data", "",
             f"- Source: {data['source']}" + (" (**synthetic**: the numbers below say nothing "
                                               "about chest X-rays)" if data["synthetic"] else ""),
             f"- Classes: {', '.join(data['class_names'])}; positive class (Sen/Spe/HM/AUC): "
             f"{data['positive_class']}", "",
             "| class | train | test |", "|---|---:|---:|"]
    lines += [f"| {c} | {n['train']} | {n['test']} |" for c, n in data["counts"].items()]
    lines += [f"| total | {sum(n['train'] for n in data['counts'].values())} | "
              f"{sum(n['test'] for n in data['counts'].values())} |", "",
              "## Protocol", "",
              f"- Backbone: {proto['arch']}, encoder start: {proto['start']}",
              f"- Labelled fraction of the training split: {proto['fraction']}"
              + (f" requested; taken: {proto['n_train']} of its {proto['n_train_split']} images "
                 f"({100 * proto['n_train'] / proto['n_train_split']:.2f}%: whole groups, at "
                 "least one per class)" if proto.get("n_train") and proto.get("n_train_split")
                 and proto["fraction"] != 1 else ""),
              f"- Fine-tuning epochs: {proto['epochs']}, input {proto['image_size']} x "
              f"{proto['image_size']} pixels, grayscale replicated to 3 channels", "",
              "## Metrics (test split)", "", f["metrics_note"] + ".", "",
              f"| metric | mean ± std, last epochs | final epoch | "
              f"{100 * info.get('ci_level', 0.95):.0f}% CI |",
              "|---|---:|---:|---:|"]
    for k, m in f["metrics"].items():
        name = display_name(k)
        ms = f"{m['mean']:.4f} ± {m['std']:.4f}" if "mean" in m else "-"
        fin = f"{m['final']:.4f}" if "final" in m else "-"
        ci = f"[{m['ci'][0]:.4f}, {m['ci'][1]:.4f}]" if "ci" in m else "-"
        if "ci" in m and m["ci"][0] == m["ci"][1] and m["ci"][0] in (0.0, 1.0):
            ci += " *"  # a boundary value: the bootstrap has no spread to show (limitations)
        lines.append(f"| {name} | {ms} | {fin} | {ci} |")
    lines += ["", "## Known limitations", ""] + [f"- {x}" for x in f["limitations"]]
    lines += ["", "## Citation", "", f"If you use this model or sstl, cite {f['citation']}.", ""]
    path = Path(folder) / "MODEL_CARD.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
