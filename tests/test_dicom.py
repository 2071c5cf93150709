"""DICOM input: synthetic files written with pydicom, decoded against a NumPy reference."""
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid  # noqa: E402

from sstl.engine.data.dicom import is_dicom, load_dicom_gray  # noqa: E402
from sstl.engine.data.index import decode_square, find_records, load_gray  # noqa: E402
from sstl.engine.predict import image_files  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dcm(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", bits=8,
              syntax=ExplicitVRLittleEndian, **tags) -> Path:
    """A minimal Part 10 DX file: one frame of unsigned grey `pixels`, extra `tags` as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    if syntax.is_compressed:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG-LS stream \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = pixels.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    try:
        ds.save_as(str(path), enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.save_as(str(path), write_like_original=False)
    return path


def minmax_u8(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


def pixels(bits: int, seed=0, shape=(40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2 ** bits, size=shape)


def test_8bit_without_a_window_keeps_its_values_as_the_png_of_the_same_pixels(tmp_path):
    """Found by a user: 8-bit DICOM without a window was stretched from its own min..max while
    the PNG of the same pixels kept its values, and the two got different diagnoses. Data of
    this depth is display-ready; the oracle is the PNG's decode (and the pixels themselves)."""
    from PIL import Image

    a = np.clip(pixels(8), 10, 200)  # the data's range is not 0..255: a stretch would show
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "a.png")
    for photometric, want in (("MONOCHROME2", a), ("MONOCHROME1", 255 - a)):
        got = load_gray(write_dcm(tmp_path / f"{photometric}.dcm", a, photometric=photometric))
        assert got.dtype == np.uint8 and got.shape == a.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(load_gray(tmp_path / "MONOCHROME2.dcm"),
                                  load_gray(tmp_path / "a.png"))
    # A rescale that changes the values makes them modality values: stretched as before.
    got = load_gray(write_dcm(tmp_path / "r.dcm", a, RescaleSlope=2, RescaleIntercept=-5))
    np.testing.assert_array_equal(got, minmax_u8(a * 2 - 5))


def test_monochrome1_is_inverted(tmp_path):
    a = pixels(12, seed=1)
    got = load_gray(write_dcm(tmp_path / "m1.dcm", a, bits=12, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(got, 255 - minmax_u8(a))


def test_12bit_with_rescale_slope_and_intercept(tmp_path):
    a = pixels(12, seed=2)
    f = write_dcm(tmp_path / "ct.dcm", a, bits=12, RescaleSlope="2", RescaleIntercept="-1024")
    np.testing.assert_array_equal(load_gray(f), minmax_u8(a * 2.0 - 1024))


def test_window_centre_width_applies_after_the_rescale(tmp_path):
    a = pixels(12, seed=3)
    c, w = 300.0, 1200.0  # in rescaled units: x * 2 - 1024 spans -1024..7166
    f = write_dcm(tmp_path / "w.dcm", a, bits=12, RescaleSlope="2", RescaleIntercept="-1024",
                  WindowCenter=str(c), WindowWidth=str(w))
    m = a * 2.0 - 1024
    # DICOM PS3.3 C.11.2.1.2.1, LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to 0..1.
    want = np.rint(np.clip((m - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    got = load_gray(f)
    assert np.abs(got.astype(int) - want).max() <= 1  # rounding at exact .5 may differ
    assert (got == want).mean() > 0.99
    assert (got == 0).any() and (got == 255).any()  # the window saturates both ends here


def test_a_file_without_suffix_is_found_and_decoded(tmp_path):
    a = pixels(8, seed=4)
    (tmp_path / "data").mkdir()
    f = write_dcm(tmp_path / "data" / "IM000001", a)
    (tmp_path / "data" / "notes").write_text("not an image")  # no suffix, no preamble: skipped
    assert is_dicom(f) and not is_dicom(tmp_path / "data" / "notes")
    _, records = find_records(tmp_path / "data")
    assert [Path(r.path).name for r in records] == ["IM000001"]
    np.testing.assert_array_equal(load_gray(f), minmax_u8(a))
    assert [Path(p).name for p, _ in image_files([tmp_path / "data"])] == ["IM000001"]


def test_a_folder_of_dcm_files_is_a_labelled_data_set(tmp_path):
    for k, cls in enumerate(("COVID", "Normal")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            write_dcm(tmp_path / cls / f"{i}.dcm", pixels(12, seed=10 * k + i), bits=12)
    root, records = find_records(tmp_path)
    assert sorted({r.label for r in records}) == ["COVID", "Normal"] and len(records) == 4
    img, err = decode_square(records[0].path, 32)
    assert err is None and img.shape == (32, 32) and img.dtype == np.uint8


def test_missing_decoder_names_the_syntax_and_package(tmp_path):
    get_decoder = pytest.importorskip("pydicom.pixels").get_decoder  # pydicom 3

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here: the missing-decoder path cannot be shown")
    f = write_dcm(tmp_path / "ls.dcm", pixels(8), syntax=JPEGLSLossless)
    with pytest.raises(ValueError, match="JPEG-LS Lossless.*pip install"):
        load_dicom_gray(f)
    img, err = decode_square(f, 32)  # what the scan does: a reason, not a crash
    assert img is None and "JPEG-LS" in err and "pylibjpeg" in err


@pytest.mark.parametrize("empty", [
    dict(WindowCenter=None, WindowWidth=None),  # present, no value: the window is not given
    dict(WindowCenter="", WindowWidth=""),
    dict(RescaleSlope=None, RescaleIntercept=None),
    dict(VOILUTSequence=[]),
], ids=["window-none", "window-blank", "rescale", "voi-lut-sequence"])
def test_present_but_empty_elements_mean_not_given(tmp_path, empty):
    """Exporters write empty elements; read as values they blanked the image (every pixel 128)
    or crashed the decode. The oracle: the same pixels without those elements (min..max)."""
    a = pixels(12, seed=4)
    f = write_dcm(tmp_path / "e.dcm", a, bits=12, **empty)
    assert all(k in pydicom.dcmread(f) for k in empty)  # the file does hold them
    np.testing.assert_array_equal(load_gray(f), minmax_u8(a))


def test_a_uniform_image_is_a_reason_not_an_image(tmp_path):
    """A blank export (or a window that maps every value to one) has nothing to read; a model
    would still predict a class for it."""
    f = write_dcm(tmp_path / "blank.dcm", np.full((40, 48), 9))
    img, err = decode_square(f, 32)
    assert img is None and "uniform image (every pixel is 9)" in err  # kept, as 8-bit data is


def test_not_a_dicom_and_no_pixels_are_reasons(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 200)
    assert decode_square(bad, 32)[0] is None
    f = write_dcm(tmp_path / "sr.dcm", pixels(8))
    ds = pydicom.dcmread(f)
    del ds.PixelData, ds.Rows, ds.Columns  # a report: no image attributes at all
    ds.save_as(str(f))
    img, err = decode_square(f, 32)
    assert img is None and "DICOM without pixel data (a report" in err


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLSLossless])
def test_a_truncated_dicom_is_called_truncated_not_a_report(tmp_path, syntax):
    """Found by a user: a compressed file cut inside its pixel data was called "a report or
    other non-image object" (pydicom drops the unfinished element with a warning, which
    leaked to the terminal). Cut before or inside the pixels, plain or encapsulated."""
    raw = write_dcm(tmp_path / "full.dcm", pixels(8, shape=(64, 64)), syntax=syntax).read_bytes()
    start = raw.index(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) Pixel Data tag
    import subprocess
    import sys

    for cut in (start - 2, start + 14):
        f = tmp_path / f"cut{cut}.dcm"
        f.write_bytes(raw[:cut])
        img, err = decode_square(f, 32)
        assert img is None and ("without its pixel data" in err or "cannot be decoded" in err
                                or "needs a decoder" in err), err
        assert "a report" not in err
    # Said once, by sstl: pydicom's warning stays off the terminal (a process of its own, as
    # pytest records warnings its own way).
    shown = subprocess.run([sys.executable, "-c", "import sys; from sstl.engine.data.index "
                            "import decode_square; print(decode_square(sys.argv[1], 32)[1])",
                            str(f)], capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip() == err and shown.stderr == "", shown.stderr


def test_the_scan_reports_an_undecodable_dicom_and_keeps_the_rest(tmp_path):
    from pydicom.pixels import get_decoder

    from sstl.engine.config import DataConfig
    from sstl.engine.data.dataset import load_dataset

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    for k, cls in enumerate(("COVID", "Normal")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            write_dcm(tmp_path / cls / f"{i}.dcm", pixels(12, seed=10 * k + i), bits=12)
    write_dcm(tmp_path / "COVID" / "ls.dcm", pixels(8), syntax=JPEGLSLossless)
    ds = load_dataset(DataConfig(path=str(tmp_path), cache_size=32, scan_workers=1),
                      need_labels=True, log=lambda s: None)
    assert len(ds.records) == 6 and ds.report["usable"] == 6 and ds.report["found"] == 7
    (skipped,) = ds.report["skipped"]
    assert skipped["path"] == "COVID/ls.dcm" and "JPEG-LS" in skipped["reason"]


@pytest.mark.parametrize("name", ["0001.dicom", "0002.dic", "0003.IMA"])
def test_a_dicom_under_another_suffix_is_found_and_decoded(tmp_path, name):
    """VinDr-CXR names its files .dicom; the preamble, not the name, says what a file is."""
    a = pixels(8, seed=5)
    for c in ("COVID", "Normal"):
        (tmp_path / "data" / c).mkdir(parents=True)
    f = write_dcm(tmp_path / "data" / "COVID" / name, a)
    write_dcm(tmp_path / "data" / "Normal" / "n.dcm", pixels(8, seed=6))
    (tmp_path / "data" / "COVID" / "readme.txt").write_text("not an image")
    _, records = find_records(tmp_path / "data")
    assert sorted((r.label, Path(r.path).name) for r in records) == [("COVID", name),
                                                                    ("Normal", "n.dcm")]
    np.testing.assert_array_equal(load_gray(f), minmax_u8(a))


@pytest.mark.parametrize("limit", [None, 65000])
def test_pixel_padding_is_black_and_left_out_of_the_stretch(tmp_path, limit):
    """A 12-bit image padded with 65535 (or 65000..65535): the body is stretched over its own
    range, as if the padding were not there, and the padding is black."""
    a = pixels(12, seed=7)
    pad = np.zeros(a.shape, dtype=bool)
    pad[:5], pad[-5:] = True, True
    a[pad] = 65535 if limit is None else np.random.default_rng(8).integers(65000, 65536, pad.sum())
    tags = {"PixelPaddingValue": 65535} if limit is None else {
        "PixelPaddingValue": 65535, "PixelPaddingRangeLimit": limit}
    got = load_gray(write_dcm(tmp_path / "p.dcm", a, bits=16, **tags))
    want = np.zeros(a.shape, dtype=np.uint8)
    want[~pad] = minmax_u8(a[~pad])
    np.testing.assert_array_equal(got, want)


def test_a_voi_lut_stored_as_ow_bytes_decodes_as_the_same_lut_in_us(tmp_path):
    """Explicit-VR writers store LUTData as OW: the same table, as bytes. Both decode alike,
    to the LUT applied to each value and stretched over the LUT's own output range."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    a = pixels(10, seed=9)
    table = (np.sqrt(np.arange(1024) / 1023.0) * 4000).astype(np.uint16)  # a gamma curve

    def lut(ow: bool):
        item = Dataset()
        item.LUTDescriptor = [1024, 0, 12]
        if ow:
            item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
        else:
            item.add_new("LUTData", "US", [int(x) for x in table])
        return Sequence([item])
    us = load_gray(write_dcm(tmp_path / "us.dcm", a, bits=10, VOILUTSequence=lut(False)))
    ow = load_gray(write_dcm(tmp_path / "ow.dcm", a, bits=10, VOILUTSequence=lut(True)))
    lo, hi = float(table.min()), float(table.max())
    want = np.rint((table[a] - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    np.testing.assert_array_equal(us, want)
    np.testing.assert_array_equal(ow, want)


def test_a_dicom_named_dicom_without_preamble_is_read(tmp_path):
    a = pixels(8, seed=11)
    f = write_dcm(tmp_path / "full.dcm", a)
    raw = f.read_bytes()[128 + 4:]  # the data set without preamble and magic
    for name in ("x.dicom", "x.dic"):
        (tmp_path / name).write_bytes(raw)
        np.testing.assert_array_equal(load_gray(tmp_path / name), minmax_u8(a))
    assert sorted(Path(p).name for p, _ in image_files([tmp_path])) == [
        "full.dcm", "x.dicom"]  # a .dic without preamble is read when named, not searched for


def test_a_long_decoder_error_is_cut_to_a_table_cell(tmp_path, monkeypatch):
    from sstl.engine.data import index

    def loud(path):
        raise ValueError("could not convert: " + "\\x00" * 5000)
    monkeypatch.setattr(index, "load_gray", loud)
    (tmp_path / "a.png").write_bytes(b"x")
    _, why = index.decode_square(tmp_path / "a.png", 32)
    assert why.startswith("could not convert") and len(why) <= 300 and "chars)" in why


def test_a_decoder_error_reads_the_same_in_every_run(tmp_path, monkeypatch):
    """pydicom names its handlers as objects (`<function f at 0x7f...>`): the reason a
    report and predictions.csv give carries no memory address."""
    import pydicom.dataset

    def failing(self):
        raise RuntimeError("no handler: <function decode at 0x7f3a2b1c9d80> gave up")
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(failing))
    write_dcm(tmp_path / "a.dcm", pixels(8))
    with pytest.raises(ValueError) as e:
        load_dicom_gray(tmp_path / "a.dcm")
    assert str(e.value).endswith("RuntimeError: no handler: <function decode> gave up")


def test_truncated_and_report_files_are_told_apart_in_decoding_threads(tmp_path):
    """The cache decodes in threads. Telling a cut file from a report by pydicom's warning
    (caught per call) raced there: a report was called truncated, a cut file a report. The
    bytes decide now; 100 of each through 8 threads, every one named right."""
    from concurrent.futures import ThreadPoolExecutor

    raw = write_dcm(tmp_path / "full.dcm", pixels(8, shape=(64, 64)),
                    syntax=JPEGLSLossless).read_bytes()
    cut = raw[:raw.index(b"\xe0\x7f\x10\x00") + 14]
    report = write_dcm(tmp_path / "r.dcm", pixels(8))
    ds = pydicom.dcmread(report)
    del ds.PixelData, ds.Rows, ds.Columns
    ds.save_as(str(report))
    files = []
    for i in range(100):
        (tmp_path / f"cut{i}.dcm").write_bytes(cut)
        (tmp_path / f"rep{i}.dcm").write_bytes(report.read_bytes())
        files += [("cut", tmp_path / f"cut{i}.dcm"), ("rep", tmp_path / f"rep{i}.dcm")]
    with ThreadPoolExecutor(8) as pool:
        said = list(pool.map(lambda kf: (kf[0], decode_square(kf[1], 32)[1]), files))
    assert all(("a report" in err) == (kind == "rep") for kind, err in said)
