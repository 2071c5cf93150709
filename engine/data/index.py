"""Find images, read a manifest, and decode any supported file to one grayscale uint8 array.

Three inputs are accepted, checked in this order:
  * a `manifest.csv` file, or a folder holding one: columns `path,label[,group][,split]`,
    paths relative to the manifest's folder;
  * a folder with one sub-folder per class (names may contain spaces). The COVID-19
    Radiography Database nests `<Class>/images/*.png` beside `<Class>/masks/`: when a class
    folder has an `images/` folder only that is read, and `masks/` folders are never read;
  * a folder of images without class folders: unlabelled (enough for pretraining).
Nothing the user owns is modified: files are only opened for reading.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import is_dicom, load_dicom_gray

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"}
MIN_SIDE = 32  # smaller files are thumbnails or icons, not radiographs


@dataclass(frozen=True)
class Record:
    path: str  # absolute path
    rel: str  # path relative to the data root (what splits and reports store)
    label: str | None  # class name; None when the folder is unlabelled
    group: str  # patient/duplicate group: never split across train and test
    split: str | None = None  # train/test when the manifest fixes it


class DataError(SystemExit):
    """A problem with the user's data, reported as a message rather than a traceback."""


def find_records(path: str | os.PathLike) -> tuple[Path, list[Record]]:
    """Return the data root and every candidate image under `path`, in a stable order."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(f"--data {p}: expected a folder or a manifest .csv file")
        return p.parent.resolve(), read_manifest(p)
    if (p / "manifest.csv").is_file():
        return p.resolve(), read_manifest(p / "manifest.csv")
    root = p.resolve()
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d))
    labelled = [(d, _images_under(d)) for d in class_dirs]
    labelled = [(d, files) for d, files in labelled if files]
    if labelled:
        return root, [Record(str(f), str(f.relative_to(root)), d.name, str(f.relative_to(root)))
                      for d, files in labelled for f in files]
    files = _images_under(root)
    if not files:
        raise DataError(f"--data {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return root, [Record(str(f), str(f.relative_to(root)), None, str(f.relative_to(root)))
                  for f in files]


def read_manifest(manifest: Path) -> list[Record]:
    root = manifest.parent.resolve()
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise DataError(f"{manifest}: a manifest needs a header with at least a `path` column")
    records = []
    for row in rows:
        rel = row["path"].strip()
        label = (row.get("label") or "").strip() or None
        split = (row.get("split") or "").strip().lower() or None
        if split not in (None, "train", "test"):
            raise DataError(f"{manifest}: split must be train or test, found {split!r} for {rel}")
        group = (row.get("group") or "").strip() or rel
        records.append(Record(str(root / rel), rel, label, group, split))
    return records


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """Images below `folder`, sorted; `<Class>/images/` wins over its siblings; masks skipped."""
    if (folder / "images").is_dir():
        folder = folder / "images"
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() != "masks")
        out += [Path(dirpath) / f for f in filenames
                if not f.startswith(".") and is_image_file(Path(dirpath) / f)]
    return sorted(out)


def is_image_file(path: Path) -> bool:
    """A supported suffix, or no suffix and a DICOM preamble (PACS exports are often unnamed)."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or (suffix == "" and is_dicom(path))


def load_gray(path: str | os.PathLike) -> np.ndarray:
    """Decode any supported image to a (H, W) uint8 grayscale array, or raise ValueError.

    8-bit data keeps its values (RGB -> luma). Deeper data (16-bit PNG, 32-bit TIFF) is
    stretched from its own min..max to 0..255: such files often hold 10-12 significant bits,
    which a fixed /257 would leave nearly black. Alpha is ignored (radiographs carry none).
    """
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    if str(path).lower().endswith(".dcm") or is_dicom(path):
        return _min_side(load_dicom_gray(path))
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
                gray = np.rint(a).astype(np.uint8)
            else:
                gray = np.asarray(im.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable or truncated: {e}") from None
    return _min_side(gray)


def _min_side(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"too small ({w}x{h} pixels, minimum {MIN_SIDE})")
    return gray


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize to size x size (the aspect ratio is not kept: lungs stay whole)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode_square(path: str | os.PathLike, size: int) -> tuple[np.ndarray | None, str | None]:
    """(image as the cache stores it: grey, size x size uint8, None) or (None, why not).

    Never raises for one bad file: a decoder crash on one file must not lose the others.
    """
    try:
        if not os.path.exists(path):
            return None, "file not found"
        return resize_square(load_gray(path), size), None
    except ValueError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
