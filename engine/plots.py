"""Figures for people, drawn with PIL alone: the confusion matrix (Figure 4's form) and the ROC.

No plotting library is a dependency; both figures are a few rectangles, lines and labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INK, GRID, BLUE, PALE = (20, 20, 20), (200, 200, 200), (31, 90, 180), (247, 251, 255)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(name: str, width: int = 12) -> str:
    """Long class names ("Bacterial Pneumonia") on two lines, split at a space."""
    if len(name) <= width or " " not in name:
        return name
    cut = min((i for i, ch in enumerate(name) if ch == " "), key=lambda i: abs(i - len(name) / 2))
    return name[:cut] + "\n" + name[cut + 1:]


def _text(d: ImageDraw.ImageDraw, xy, text: str, size: int, fill=INK, anchor="mm") -> None:
    d.multiline_text(xy, text, font=_font(size), fill=fill, anchor=anchor, align="center")


def _vertical_text(img: Image.Image, center, text: str, size: int) -> None:
    """Text rotated 90 degrees (the y-axis title), pasted centred at `center`."""
    box = ImageDraw.Draw(img).textbbox((0, 0), text, font=_font(size))
    tile = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
    ImageDraw.Draw(tile).text((2, 2), text, font=_font(size), fill=INK)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (int(center[0] - tile.width / 2), int(center[1] - tile.height / 2)))


def _shade(frac: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Cell colour from white to blue by the row share, and a readable text colour on it."""
    f = 0.0 if np.isnan(frac) else float(frac)
    cell = tuple(int(round(p + (b - p) * f)) for p, b in zip(PALE, BLUE))
    return cell, ((255, 255, 255) if f > 0.55 else INK)


def confusion_png(cm: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Counts and row-normalised % per cell; rows are the true class, columns the prediction."""
    k, cell, left, top = len(class_names), 130, 190, 90
    img = Image.new("RGB", (left + k * cell + 40, top + k * cell + 120), "white")
    d = ImageDraw.Draw(img)
    _text(d, (img.width / 2, 30), title, 20)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.full(cm.shape, np.nan), where=rows > 0)
    for i in range(k):
        for j in range(k):
            x0, y0 = left + j * cell, top + i * cell
            fill, ink = _shade(share[i, j])
            d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fill, outline=GRID)
            pct = "-" if np.isnan(share[i, j]) else f"{100 * share[i, j]:.1f}%"
            _text(d, (x0 + cell / 2, y0 + cell / 2), f"{int(cm[i, j])}\n{pct}", 18, ink)
    for i, name in enumerate(class_names):
        _text(d, (left - 10, top + i * cell + cell / 2), _wrap(name), 15, anchor="rm")
        _text(d, (left + i * cell + cell / 2, top + k * cell + 25), _wrap(name), 15)
    _text(d, (left + k * cell / 2, top + k * cell + 85), "Predicted class", 17)
    _vertical_text(img, (22, top + k * cell / 2), "True class", 17)
    img.save(path)


def roc_png(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: Path, title: str) -> None:
    """The ROC curve on the unit square, with the chance diagonal and the AUC."""
    side, left, top = 460, 80, 70
    img = Image.new("RGB", (left + side + 40, top + side + 80), "white")
    d = ImageDraw.Draw(img)
    px = lambda x, y: (left + x * side, top + (1 - y) * side)  # noqa: E731 - unit -> pixels
    _text(d, (img.width / 2, 30), title, 18)
    for t in np.linspace(0, 1, 6):
        d.line([px(t, 0), px(t, 1)], fill=(235, 235, 235))
        d.line([px(0, t), px(1, t)], fill=(235, 235, 235))
        _text(d, (px(t, 0)[0], top + side + 15), f"{t:.1f}", 13)
        _text(d, (left - 20, px(0, t)[1]), f"{t:.1f}", 13)
    d.rectangle([px(0, 1), px(1, 0)], outline=INK)
    for a in np.linspace(0, 0.95, 20):  # the chance diagonal, dashed
        d.line([px(a, a), px(a + 0.025, a + 0.025)], fill=(150, 150, 150), width=1)
    if len(fpr) > 1:
        d.line([px(x, y) for x, y in zip(fpr, tpr)], fill=BLUE, width=3)
    label = "AUC undefined (one class)" if np.isnan(auc) else f"AUC = {auc:.4f}"
    _text(d, (px(0.62, 0.1)), label, 17)
    _text(d, (left + side / 2, top + side + 45), "False positive rate (1 - specificity)", 15)
    _vertical_text(img, (20, top + side / 2), "True positive rate (sensitivity)", 15)
    img.save(path)
