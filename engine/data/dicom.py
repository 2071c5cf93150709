"""DICOM radiographs to the one grayscale uint8 array every other format decodes to.

The display pipeline of the DICOM standard (PS3.3 C.11), in its order:
  1. stored values -> modality values: Modality LUT or Rescale Slope/Intercept;
  2. modality values -> display values: the first VOI LUT, or else the first Window
     Centre/Width; the display range of that transform is mapped to 0..255. Without either,
     unsigned data of 8 bits or fewer, unchanged by step 1, keeps its values (as an 8-bit
     PNG does), and deeper data's own min..max is mapped (12-16 bit data rarely fills its
     nominal range);
  3. MONOCHROME1 (white = low values) is inverted, so that bone is bright in every image;
  4. Pixel Padding (the area outside the image, often the type's extreme value) is black,
     and left out of the min..max above.
Compressed transfer syntaxes go through pydicom's decoders; a missing one is a ValueError
naming the syntax and what to install, which the scan reports for that file alone.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

PREAMBLE = 128  # bytes before the "DICM" magic in a Part 10 file
PIXEL_DATA_TAG, PIXEL_DATA_TAG_BE = b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"  # (7FE0,0010)
# A file cut inside its pixel data: the reason is said per file (load_dicom_gray), not as
# pydicom's warning on the terminal, once per file, in the middle of a progress bar.
warnings.filterwarnings("ignore", message="End of file reached before delimiter")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")  # names that say DICOM even without the magic


def _luts():
    """pydicom's modality and VOI transforms: pydicom.pixels from 3.0, its old home in 2.x."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def is_dicom(path: str | os.PathLike) -> bool:
    """A Part 10 file: "DICM" at byte 128 (whatever its name, as PACS exports often have none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(PREAMBLE)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_dicom_gray(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 of a DICOM file's first frame, or ValueError saying why not."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force: a file named as DICOM but without the preamble (older exports) is still read.
        ds = pydicom.dcmread(path, force=str(path).lower().endswith(DICOM_SUFFIXES))
    except (InvalidDicomError, EOFError, OSError) as e:
        raise ValueError(f"not a readable DICOM file ({str(e).split(' Use force=')[0]})") from None
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ValueError("DICOM with float pixel data (parametric maps), which sstl does "
                             "not read")
        if ("Rows" in ds and "Columns" in ds) or _has_pixel_tag(path):
            raise ValueError("DICOM image without its pixel data: the file ends before or "
                             "inside it (truncated: an incomplete copy or transfer?)")
        raise ValueError("DICOM without pixel data (a report or other non-image object)")
    uid = _transfer_syntax(ds)
    _check_decoder(uid)
    try:
        arr = ds.pixel_array
    except Exception as e:  # a truncated or malformed pixel stream (or, in pydicom 2, no decoder)
        # Without memory addresses (pydicom names its handlers as objects): a report lists
        # many such files, and the same failure should read the same in every run.
        raise ValueError(f"DICOM pixel data ({uid.name}) cannot be decoded: "
                         f"{type(e).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))}"
                         ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # a radiograph series: its first frame
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # secondary captures: pydicom gives RGB
        return _luma(arr)
    return to_uint8(arr, ds)


def _has_pixel_tag(path) -> bool:
    """Whether the file holds a Pixel Data tag that pydicom dropped: a file cut inside its
    pixel data (pydicom reads up to the end, warns, and leaves the element out). Read from
    the bytes: the warning cannot be caught per file in the cache's decoding threads."""
    with open(path, "rb") as fh:
        data = fh.read()
    return PIXEL_DATA_TAG in data or PIXEL_DATA_TAG_BE in data


def _transfer_syntax(ds):
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    return UID((meta.get("TransferSyntaxUID") if meta else None) or "1.2.840.10008.1.2.1")


def _check_decoder(uid) -> None:
    """ValueError naming the transfer syntax and the packages that decode it, if none is here."""
    if not uid.is_compressed:
        return
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2.x: pixel_array's own error names the missing handler
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ValueError(f"DICOM transfer syntax {uid.name} ({uid}) has no decoder in "
                         "pydicom") from None
    if not decoder.is_available:
        options = [m.split(" - requires ", 1)[-1] for m in decoder.missing_dependencies]
        raise ValueError(f"compressed DICOM ({uid.name}) needs a decoder that is not installed: "
                         f"pip install one of: {'; '.join(options)}")


def to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """Stored grey values -> display uint8: modality LUT, VOI (or min-max), MONOCHROME1 flip."""
    apply_modality_lut, apply_voi_lut = _luts()
    # Present but empty elements (exporters write them) mean "not given": pydicom would
    # otherwise multiply by None, index an empty sequence, or skip the window silently.
    for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
               "VOILUTSequence"):
        if kw in ds and _empty(ds[kw].value):
            del ds[kw]
    pad = _padding(arr, ds)
    v = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        # The LUT's display range: its outputs over every input it maps (read by pydicom,
        # whether LUTData is stored as US or as OW bytes).
        first, n = int(ds.VOILUTSequence[0].LUTDescriptor[1]), \
            int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 65536
        out = np.asarray(apply_voi_lut(np.arange(first, first + n), ds), dtype=np.float64)
        lo, hi = float(out.min()), float(out.max())
        v = np.asarray(apply_voi_lut(v.astype(np.int64), ds), dtype=np.float64)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # The window's display range: what it maps values far outside it to.
        lo, hi = sorted(float(y) for y in apply_voi_lut(np.array([-1e12, 1e12]), ds,
                                                        prefer_lut=False))
        v = np.asarray(apply_voi_lut(v, ds, prefer_lut=False), dtype=np.float64)
    elif _display_ready(arr, v, ds):  # as an 8-bit PNG of the same pixels decodes
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:  # the image's own range; padding (often the type's extreme) would crush it
        body = v[~pad] if (~pad).any() else v
        lo, hi = float(body.min()), float(body.max())
    v = np.zeros_like(v) if hi <= lo else (v - lo) * (255.0 / (hi - lo))
    gray = np.rint(np.clip(v, 0, 255)).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        gray = 255 - gray
    gray[pad] = 0  # outside the image area: shown black, whatever the photometry
    return gray


def _display_ready(arr: np.ndarray, v: np.ndarray, ds) -> bool:
    """Unsigned data of 8 bits or fewer that no modality transform changed: display values
    already (a secondary capture, a converted PNG), kept as they are rather than stretched,
    so the same pixels decode alike in DICOM and in PNG. Deeper data keeps the min..max."""
    bits = int(ds.get("BitsStored", 0) or 0)
    return (0 < bits <= 8 and not int(ds.get("PixelRepresentation", 0) or 0)
            and np.array_equal(v, arr))


def _padding(arr: np.ndarray, ds) -> np.ndarray:
    """Where the stored values are Pixel Padding (PS3.3 C.7.5.1.1.2): the value itself, or
    every value between it and Pixel Padding Range Limit. They mark no image at all."""
    value = ds.get("PixelPaddingValue")
    if value is None or _empty(value):
        return np.zeros(arr.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or _empty(limit):
        return arr == int(value)
    lo, hi = sorted((int(value), int(limit)))
    return (arr >= lo) & (arr <= hi)


def _empty(value) -> bool:
    if value is None or value == "":
        return True
    try:
        return len(value) == 0
    except TypeError:  # a number
        return False


def _luma(rgb: np.ndarray) -> np.ndarray:
    """RGB -> grey with PIL's ITU-R 601 weights, as load_gray does for colour images."""
    from PIL import Image

    if rgb.dtype != np.uint8:
        lo, hi = float(rgb.min()), float(rgb.max())
        rgb = np.rint((rgb - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"), dtype=np.uint8)
