"""Find images, read a manifest, and decode any supported file to one grayscale uint8 array.

Three inputs are accepted, checked in this order:
  * a `manifest.csv` file, or a folder holding one: columns `path,label[,group][,split]`,
    paths relative to the manifest's folder. Header names are matched ignoring case and
    surrounding spaces (`Label` is `label`). A column that looks like a misspelt or renamed
    accepted one (`lable`, `class`, `filename`, ...) while that column is missing is a
    DataError with a "did you mean"; other extra columns (`source`, `age`) are kept out of
    the data and named in the scan's notes;
  * a folder with one sub-folder per class (names may contain spaces). Every image below a
    class folder belongs to that class, at any depth: the COVID-19 Radiography Database's
    `<Class>/images/*.png` is read, and so are images beside that `images/` folder;
  * a folder of images without class folders: unlabelled (enough for pretraining).

Every image file under the data root is either a candidate Record or "left out" with a
reason, so nothing disappears silently. Folders are left out whole, as ONE entry with the
number of image files inside (one entry per file would bury the report under the 21,165
masks of the COVID-19 Radiography Database):
  * `masks/` folders (any case): "segmentation mask folder";
  * hidden folders (`.name`) and links to folders, which are not followed;
  * with a manifest, images it does not list: one entry per folder, "not listed in the manifest".
Single files are left out one entry each: hidden image files, and images lying directly in a
root that has class folders ("outside any class folder").
Nothing the user owns is modified: files are only opened for reading.
"""
from __future__ import annotations

import codecs
import csv
import functools
import io
import difflib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import DICOM_SUFFIXES, is_dicom, load_dicom_gray

# Pillow only warns between MAX_IMAGE_PIXELS and twice that, and then decodes: load_gray refuses
# those images itself ("too large", one reason in data_report.json), so the warning, two raw
# lines per file, says nothing more. (A filter, not catch_warnings: the scan decodes on threads.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Every suffix PIL or pydicom reads radiographs under (JPEG's .jfif/.jpe, the Netpbm family,
# JPEG 2000); a file listed here that will not decode is reported, never silently ignored.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".gif",
                  ".webp", ".pgm", ".ppm", ".pbm", ".pnm", ".jp2", ".j2k", ".dcm", ".dicom"}
# (.dic is also a spelling dictionary's suffix: in a folder, only its DICOM preamble counts.)
MIN_SIDE = 32  # smaller files are thumbnails or icons, not radiographs
# Folders archives and file systems add beside the data: never classes.
SYSTEM_FOLDERS = ("__MACOSX", "lost+found", "$RECYCLE.BIN", "System Volume Information")


@dataclass(frozen=True)
class Record:
    path: str  # absolute path
    rel: str  # path relative to the data root (what splits and reports store)
    label: str | None  # class name; None when the folder is unlabelled
    group: str  # patient/duplicate group: never split across train and test
    split: str | None = None  # train/test when the manifest fixes it


class DataError(SystemExit):
    """A problem with the user's data, reported as a message rather than a traceback."""


@dataclass
class Scan:
    root: Path
    records: list[Record]  # candidate images, in a stable order
    left_out: list[dict] = field(default_factory=list)  # {"path", "reason"[, "files"]} not read
    notes: list[str] = field(default_factory=list)  # one-line remarks for the log
    empty_folders: list[str] = field(default_factory=list)  # beside class folders, no file


def find_records(path: str | os.PathLike) -> tuple[Path, list[Record]]:
    """Return the data root and every candidate image under `path`, in a stable order."""
    s = scan(path)
    return s.root, s.records


def scan(path: str | os.PathLike) -> Scan:
    """Candidate images under `path`, and every other image file there with why it is not used."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(f"--data {p}: expected a folder or a manifest .csv file")
        return _scan_manifest(p)
    if (p / "manifest.csv").is_file():
        return _scan_manifest(p / "manifest.csv")
    return _scan_folder(p)


def spelling_clashes(labels) -> list[list[str]]:
    """Labels that differ only in case, spacing or underscores (`COVID` and `covid`, `Viral
    Pneumonia` and `Viral_Pneumonia`), grouped: where labels count, each would silently be a
    class of its own, half a class then counted as the rest against every metric."""
    spellings: dict[str, set[str]] = {}
    for label in labels:
        if label is not None:
            spellings.setdefault(" ".join(label.replace("_", " ").split()).casefold(),
                                 set()).add(label)
    return sorted(sorted(v) for v in spellings.values() if len(v) > 1)


def _scan_folder(p: Path) -> Scan:
    """Class folders (or, without any, an unlabelled folder) under `p`."""
    root = p.resolve()
    out = Scan(root, [])
    class_dirs = []
    for d in sorted(root.iterdir()):
        why = _folder_left_out(d) if d.is_dir() else None
        if why:
            _leave_out_folder(d, root, why, out.left_out)
        elif d.is_dir():
            class_dirs.append(d)
    labelled = [(d, images_under(d, root, out.left_out)) for d in class_dirs]
    empty = [d for d, files in labelled if not files]
    labelled = [(d, files) for d, files in labelled if files]
    if labelled:
        for d in empty:  # a class whose files were all of an unknown kind must not vanish unsaid
            if any(e["path"] == _rel(d, root) for e in out.left_out):
                continue  # unreadable: left_out says so
            other = sorted(f.name for f in d.rglob("*") if f.is_file())
            if not other:  # nothing at all: a class that failed to copy, most likely (said
                out.empty_folders.append(d.name)  # by load_dataset, which knows the command)
                continue
            out.notes.append(f"folder {d.name!r} holds no image file, so it is not a class "
                             f"({len(other)} other files, e.g. {other[0]!r})")
        for f in _image_files(root):
            out.left_out.append({"path": f.name, "reason": "outside any class folder"})
        out.records = [Record(str(f), _rel(f, root), d.name, _rel(f, root))
                       for d, files in labelled for f in files]
        return out
    out.left_out = []  # no class folders: the walk below meets the same folders again
    files = images_under(root, root, out.left_out)
    if not files:
        raise DataError(f"--data {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found"
                        + (f"; left out: {out.left_out[:3]}" if out.left_out else ""))
    out.records = [Record(str(f), _rel(f, root), None, _rel(f, root)) for f in files]
    return out


def _rel(f: Path, root: Path) -> str:
    return f.relative_to(root).as_posix()


ACCEPTED_COLUMNS = ("path", "label", "group", "split")
# Names people give these columns; a misspelling is caught by difflib instead.
_SYNONYMS = {
    "path": ("file", "filename", "file_name", "filepath", "file_path", "image", "image_path",
             "img", "image_id"),
    "label": ("class", "classes", "class_name", "target", "diagnosis", "category", "finding",
              "findings"),
    "group": ("patient", "patient_id", "patientid", "subject", "subject_id"),
    "split": ("set", "subset"),
}


def _scan_manifest(manifest: Path) -> Scan:
    root = manifest.parent.resolve()
    # Decoded whole, so an error's offset is the file's; the byte-order mark spreadsheets save
    # would otherwise hide `path`.
    raw = manifest.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # Excel's plain "CSV" on Windows writes cp1252
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{manifest}: not UTF-8 text (byte {raw[e.start]:#04x} on line {line}); "
                        "save it as \"CSV UTF-8\" (Excel) or convert it, e.g. iconv -f cp1252 "
                        "-t utf-8") from None
    # strict: an unclosed quote is an error, where csv would read the rest of the file as
    # one field (a path like "a,b\nc.png,COVID" that then "does not exist").
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, [])
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except csv.Error as e:
        raise DataError(f"{manifest}: not valid CSV on line {reader.line_num} ({e}); check "
                        "its quotes") from None
    columns, extra = _manifest_columns(manifest, header)

    def get(row: list[str], name: str) -> str:
        i = columns.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    records, seen = [], {}
    for line, row in rows:
        # One spelling per file: `./x/1.png`, `x//1.png` and a Windows `x\1.png` are x/1.png.
        rel = Path(os.path.normpath(get(row, "path").replace("\\", "/"))).as_posix()
        if rel == ".":
            raise DataError(f"{manifest}: the row on line {line} has no path")
        # The file itself, however named (absolute, through ../ or a link): a file listed
        # twice would count twice, and could land in both splits under two labels. (`rel`
        # stays as written: it names the file in split.json and in the data fingerprint.)
        real = _real(root / rel)
        if real in seen:
            first, where = seen[real]
            raise DataError(f"{manifest}: {rel} is listed twice (lines {where} and {line}"
                            + (f", also as {first}" if first != rel else "") + "); list each "
                            "file once")
        seen[real] = (rel, line)
        split = get(row, "split").lower() or None
        if split not in (None, "train", "test"):
            raise DataError(f"{manifest}: split must be train or test, found {split!r} for {rel}")
        records.append(Record(str(root / rel), rel, get(row, "label") or None,
                              get(row, "group") or rel, split))
    if not records:  # else "none of the 0 files could be read", which misleads
        raise DataError(f"{manifest}: lists no images (a header and no rows); add one row per "
                        "image: path,label")
    out = Scan(root, records)
    if extra:
        out.notes.append(f"{manifest.name}: columns not used: {', '.join(extra)}")
    _leave_out_unlisted(out)
    return out


def _real(path: Path) -> str:
    """The file a path names: its folder resolved once per folder (a manifest of 200k rows
    holds few folders), then the file itself where it is a link."""
    real = os.path.join(_real_folder(str(path.parent)), path.name)
    return os.path.realpath(real) if os.path.islink(real) else real


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _manifest_columns(manifest: Path, header: list[str]) -> tuple[dict[str, int], list[str]]:
    """Accepted column -> index (names matched ignoring case), and the extra column names."""
    accepted_txt = f"accepted columns: {', '.join(ACCEPTED_COLUMNS)} (case does not matter)"
    columns: dict[str, int] = {}
    extra = []
    for i, name in enumerate(header):
        key = name.strip().lower()
        if key in ACCEPTED_COLUMNS:
            if key in columns:
                raise DataError(f"{manifest}: column {key!r} appears twice in the header; keep one")
            columns[key] = i
        elif key:
            extra.append(name.strip())
    # An extra column that resembles a MISSING accepted one is a mistake (`lable` makes the
    # data silently unlabelled); others (`source`, `age`) are metadata and merely noted.
    missing = [c for c in ACCEPTED_COLUMNS if c not in columns]
    for name in extra:
        guess = _did_you_mean(name.lower(), missing)
        if guess:
            raise DataError(f"{manifest}: unknown column {name!r} (did you mean {guess!r}?); "
                            f"{accepted_txt}; rename it (or remove it if it means something else)")
    if "path" not in columns:
        raise DataError(f"{manifest}: a manifest needs a header with a `path` column, "
                        f"found {header}; {accepted_txt}")
    return columns, extra


def _did_you_mean(name: str, candidates: list[str]) -> str | None:
    for col in candidates:
        if name in _SYNONYMS[col]:
            return col
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.7)
    return close[0] if close else None


def _leave_out_unlisted(out: Scan) -> None:
    """Images under the manifest's folder that it does not list: one entry per folder, with
    the first such file's name (a folder's count alone leaves the user searching)."""
    listed = {os.path.normpath(r.path) for r in out.records}
    per_folder: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(out.root):
        dirnames[:] = sorted(dirnames)
        for f in sorted(filenames):
            if _is_image_name(f) and os.path.normpath(os.path.join(dirpath, f)) not in listed:
                folder = Path(dirpath).relative_to(out.root).as_posix()
                per_folder.setdefault(folder, []).append(f)
    out.left_out += [{"path": folder, "reason": "not listed in the manifest", "files": len(fs),
                      "first": fs[0] if folder == "." else f"{folder}/{fs[0]}"}
                     for folder, fs in sorted(per_folder.items())]


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (hidden ones included: they are left out too)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and _is_image_name(f.name))


def _leave_out_folder(folder: Path, root: Path, reason: str, left_out: list[dict]) -> None:
    n = sum(_is_image_name(f) for _, _, files in os.walk(folder) for f in files)
    if n:  # a folder without images (.git, an empty masks/) is not data: no entry
        left_out.append({"path": _rel(folder, root), "reason": reason, "files": n})


def _folder_left_out(d: Path) -> str | None:
    """Why a folder's images are not data, or None. The same rules at every depth: a top-level
    `masks/` is not a class, and a linked class folder would read its images twice."""
    if d.name.startswith("."):
        return "hidden folder"
    if d.name.lower() == "masks":
        return "segmentation mask folder"
    if d.name in SYSTEM_FOLDERS:
        return "system folder (not data)"
    if d.is_symlink():
        return "link to a folder (not followed)"
    return None


def images_under(folder: Path, root: Path, left_out: list[dict]) -> list[Path]:
    """Images below `folder`, sorted; masks, hidden, linked and unreadable folders and hidden
    files go to `left_out` with their reason instead."""
    out = []

    def unreadable(e: OSError) -> None:  # os.walk would skip the folder without a word
        where = Path(e.filename) if e.filename else folder
        left_out.append({"path": _rel(where, root),
                         "reason": f"unreadable folder ({e.strerror or type(e).__name__})"})
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        here, keep = Path(dirpath), []
        for d in sorted(dirnames):
            why = _folder_left_out(here / d)
            if why:
                _leave_out_folder(here / d, root, why, left_out)
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if not is_image_file(here / f):  # suffix-less DICOM files included
                continue
            if f.startswith("."):
                left_out.append({"path": _rel(here / f, root), "reason": "hidden file"})
            else:
                out.append(here / f)
    return sorted(out)


def is_image_file(path: Path) -> bool:
    """A supported suffix, or a DICOM preamble whatever the name: PACS exports are often
    unnamed, and some sets name their files `.dicom` (VinDr-CXR) or `.dic`."""
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def load_gray(path: str | os.PathLike) -> np.ndarray:
    """Decode any supported image to a (H, W) uint8 grayscale array, or raise ValueError.

    8-bit data keeps its values (RGB -> luma). Deeper data (16-bit PNG, 32-bit TIFF) is
    stretched from its own min..max to 0..255: such files often hold 10-12 significant bits,
    which a fixed /257 would leave nearly black. Alpha is ignored (radiographs carry none).
    """
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    if str(path).lower().endswith(DICOM_SUFFIXES) or is_dicom(path):
        return _checked(load_dicom_gray(path))
    try:
        with Image.open(path) as im:
            if im.width * im.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise Image.DecompressionBombWarning("over the pixel limit")  # said just below
            if raw := _deep_colour(im):  # Pillow calls grey+alpha at 16 bits RGBA: say which
                kind = "grey+alpha" if raw.startswith("LA") else "colour"
                raise ValueError(f"16 bits per channel in a {kind} image ({raw}; Pillow keeps "
                                 "only the high byte, which would turn a 12-bit radiograph "
                                 "black); save it as 16-bit greyscale")
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                a = np.asarray(im, dtype=np.float64)
                bad = int((~np.isfinite(a)).sum())
                if bad:  # a corrupt or unfinished file: no pixel of it can be trusted
                    raise ValueError(f"{bad} non-finite pixel values (NaN or infinity)")
                lo, hi = float(a.min()), float(a.max())
                a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
                gray = np.rint(a).astype(np.uint8)
            else:
                gray = np.asarray(im.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(_too_large(path, e)) from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"unreadable or truncated: {e}") from None
    return _checked(gray)


def _deep_colour(im: Image.Image) -> str | None:
    """The raw mode (`LA;16B`, `RGB;16B`...) of a colour or grey+alpha file of 16 bits per
    channel (its tiles', read before decoding), else None: Pillow decodes such a file to 8
    bits by dropping each value's low byte."""
    if im.mode not in ("RGB", "RGBA", "LA", "RGBX"):
        return None
    for tile in im.tile:
        raw = tile[3][0] if isinstance(tile[3], tuple) else tile[3]
        if isinstance(raw, str) and re.search(r";16[BLN]$", raw):  # not BMP's BGR;16 (RGB565)
            return raw
    return None


def _checked(gray: np.ndarray) -> np.ndarray:
    """The checks every decoded image passes: big enough, and not one flat value."""
    h, w = gray.shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"too small ({w}x{h} pixels, minimum {MIN_SIDE})")
    if gray.min() == gray.max():  # nothing to read, yet a model would still predict a class
        raise ValueError(f"uniform image (every pixel is {int(gray.flat[0])}): blank, or "
                         "its display window maps every value to one")
    return gray


def _too_large(path, err: Exception) -> str:
    """PIL refuses images over its pixel limit (a decompression-bomb guard): say so plainly."""
    limit = Image.MAX_IMAGE_PIXELS or 0
    limit = 2 * limit if isinstance(err, Image.DecompressionBombError) else limit
    size = _header_size(path)
    shown = f"{size[0]} x {size[1]} pixels" if size else str(err)
    return f"too large ({shown}, limit {limit} pixels)"


def _header_size(path) -> tuple[int, int] | None:
    """Width and height from the file header alone. Image.open will not tell (it raises the
    bomb error first), so ask each format's reader directly, as Image.open itself does."""
    Image.init()
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for fmt in Image.ID:
                factory, accept = Image.OPEN[fmt]
                if accept and accept(prefix) is not True:
                    continue
                try:
                    fp.seek(0)
                    return factory(fp, str(path)).size
                except Exception:
                    continue
    except OSError:
        pass
    return None


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
        return None, _short(str(e))
    except Exception as e:
        return None, _short(f"{type(e).__name__}: {e}")


def _short(reason: str, limit: int = 300) -> str:
    """A reason fit for a table cell: a decoder may quote kilobytes of the file's bytes."""
    return reason if len(reason) <= limit else reason[:limit - 30] + f"... ({len(reason)} chars)"
