"""`sstl export`: ONNX probabilities equal torch's; the sidecar states the preprocessing."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sstl.engine.data.index import decode_square  # noqa: E402
from sstl.engine.data.views import eval_view  # noqa: E402
from sstl.engine.export import export_onnx  # noqa: E402
from sstl.engine.models import load_classifier  # noqa: E402
from tests.conftest import CXR_SMALL, needs_shared  # noqa: E402
from tests.tiny_run import make_run, write_pngs  # noqa: E402


def onnx_vs_torch(run, onnx_path, files):
    """Both models on the same tensors, built here the way predict() builds them."""
    model, meta = load_classifier(run)
    grey = np.stack([decode_square(f, meta["cache_size"])[0] for f in files])
    x = eval_view(torch.from_numpy(grey), meta["image_size"])
    with torch.no_grad():
        want = model(x).softmax(1).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(["probs"], {"input": x.numpy()})[0]
    return got, want


def test_export_matches_torch_on_synthetic_images(tmp_path):
    run = make_run(tmp_path / "run")
    files = write_pngs(tmp_path / "imgs", n=5)
    r = export_onnx(run, images=(str(tmp_path / "imgs"),))
    assert r["ok"] and r["images_checked"] == 5 and r["max_abs_diff_probs"] <= 1e-4
    got, want = onnx_vs_torch(run, run / "model.onnx", files)  # 5 images: the batch axis is free
    assert got.shape == (5, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    side = json.loads((run / "model.json").read_text())  # the weights' sidecar is untouched
    assert side["kind"] == "sstl-classifier"
    meta = json.loads((run / "model.onnx.json").read_text())
    pre = meta["preprocessing"]
    assert meta["opset"] == 17 and pre["input_shape"] == ["batch", 3, 32, 32]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["class_names"] == ["COVID", "Normal"]
    assert meta["verification"]["max_abs_diff_probs"] == r["max_abs_diff_probs"]


def test_export_without_images_falls_back_to_synthetic(tmp_path):
    import os

    run = make_run(tmp_path / "run")
    old = os.umask(0o077)  # a private umask: the files must still come out 0644
    try:
        r = export_onnx(run, out=tmp_path / "x" / "m.onnx")
    finally:
        os.umask(old)
    assert r["ok"] and r["images_checked"] == 8 and "synthetic" in r["check_source"]
    assert (tmp_path / "x" / "m.onnx.json").is_file()
    # Readable by the other users and tools a deployment runs as, like every file sstl writes.
    assert {(tmp_path / "x" / f).stat().st_mode & 0o777 for f in ("m.onnx", "m.onnx.json")} == {0o644}


@needs_shared
def test_export_matches_torch_on_real_chest_xrays(tmp_path):
    run = make_run(tmp_path / "run", image_size=64, cache_size=64)
    files = sorted((CXR_SMALL).rglob("*.png"))[::75][:8]
    r = export_onnx(run, images=tuple(map(str, files)))
    assert r["ok"] and r["images_checked"] == len(files) >= 4
    got, want = onnx_vs_torch(run, run / "model.onnx", files)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_cli_export_reports_the_difference(tmp_path):
    from typer.testing import CliRunner

    from sstl.cli.main import app

    run = make_run(tmp_path / "run")
    write_pngs(tmp_path / "imgs", n=2)
    res = CliRunner().invoke(app, ["export", "--model", str(run), "--out",
                                   str(tmp_path / "m.onnx"), "--images", str(tmp_path / "imgs")])
    assert res.exit_code == 0, res.output
    assert "max |diff|" in res.output and (tmp_path / "m.onnx").is_file()
    bad = CliRunner().invoke(app, ["export", "--model", str(run), "--format", "tflite"])
    assert bad.exit_code != 0 and "--format must be onnx" in bad.output
    (tmp_path / "folder").mkdir()
    for args, said in ((["--tolerance", "nan"], "--tolerance must be >= 0"),
                       (["--out", str(tmp_path / "folder")], "is a folder")):
        bad = CliRunner().invoke(app, ["export", "--model", str(run), *args])
        assert bad.exit_code not in (0, None) and said in bad.output, bad.output
    assert list((tmp_path / "folder").iterdir()) == [] and not (tmp_path / "folder.json").exists()


def test_the_onnx_file_describes_itself_without_its_sidecar(tmp_path):
    """A model.onnx copied alone still says its classes (in output order), positive class,
    input and origin: onnxruntime reads them from its metadata_props."""
    from importlib import metadata

    from sstl.engine.data.cache import file_digest
    from sstl.engine.io import save_json

    run = make_run(tmp_path / "run", class_names=["Normal", "COVID", "Pneumonia"])
    side = json.loads((run / "model.json").read_text())
    save_json({**side, "settings_hash": "0123abcd"}, run / "model.json")
    export_onnx(run, out=tmp_path / "out" / "m.onnx")
    alone = tmp_path / "copied.onnx"
    alone.write_bytes((tmp_path / "out" / "m.onnx").read_bytes())
    props = ort.InferenceSession(str(alone)).get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == ["Normal", "COVID", "Pneumonia"]
    assert props["positive_class"] == "COVID" and props["kind"] == "sstl-onnx-classifier"
    assert (props["image_size"], props["cache_size"]) == ("32", "48")
    assert json.loads(props["mean"]) == [0.485, 0.456, 0.406]
    sidecar = json.loads((tmp_path / "out" / "m.onnx.json").read_text())
    assert json.loads(props["preprocessing"]) == sidecar["preprocessing"]
    assert props["source_run"] == "run" and props["settings_hash"] == "0123abcd"
    assert props["source_weights_blake2b"] == file_digest(run / "model.safetensors")
    assert props["sstl_version"] == metadata.version("sstl") and props["sstl_git_sha"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter
def test_export_replaces_an_earlier_export_and_no_other_file(tmp_path):
    """--out naming another tool's ONNX model, an image renamed .onnx, or beside a .onnx.json
    that no export wrote is refused before anything is written; an earlier sstl export (its
    metadata says so; one made before sstl wrote metadata: its sidecar) is replaced."""
    import onnx

    run = make_run(tmp_path / "run")
    theirs = tmp_path / "theirs.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), torch.zeros(1, 3), str(theirs), dynamo=False)
    png = write_pngs(tmp_path / "imgs", n=1)[0].rename(tmp_path / "scan.onnx")
    (tmp_path / "lone.onnx.json").write_text('{"my": "notes"}')
    victims = {f: f.read_bytes() for f in (theirs, png, tmp_path / "lone.onnx.json")}
    for out, said in ((theirs, "theirs.onnx exists and is not an earlier sstl export"),
                      (png, "scan.onnx exists and is not an earlier sstl export"),
                      (tmp_path / "lone.onnx", "lone.onnx.json exists and is not the sidecar")):
        with pytest.raises(SystemExit, match=said + ".*would replace it; name a"):
            export_onnx(run, out=out)
    assert {f: f.read_bytes() for f in victims} == victims
    assert sorted(p.name for p in tmp_path.glob("*.onnx*")) == ["lone.onnx.json", "scan.onnx",
                                                                "theirs.onnx"]
    first = export_onnx(run, out=tmp_path / "m.onnx")
    export_onnx(make_run(tmp_path / "run2", seed=1), out=tmp_path / "m.onnx")  # replaced
    props = ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
    assert first["ok"] and props["source_run"] == "run2"
    older = onnx.load(str(tmp_path / "m.onnx"))  # as exports were before the metadata
    onnx.helper.set_model_props(older, {})
    onnx.save(older, str(tmp_path / "m.onnx"))
    assert export_onnx(run, out=tmp_path / "m.onnx")["ok"]


def test_cli_export_says_how_many_given_images_could_not_be_read(tmp_path):
    """A check on fewer images than given says how many were not read, and the first why."""
    from typer.testing import CliRunner

    from sstl.cli.main import app

    run = make_run(tmp_path / "run")
    imgs = tmp_path / "imgs"
    write_pngs(imgs, n=3)
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (imgs / "empty.png").write_bytes(b"")
    write_pngs(imgs / "masks", n=1)  # the scan leaves masks out, and says so
    res = CliRunner().invoke(app, ["export", "--model", str(run), "--out",
                                   str(tmp_path / "m.onnx"), "--images", str(imgs)])
    assert res.exit_code == 0, res.output
    assert (f"checked on 3 of the given images; 2 could not be read (first: {imgs / 'broken.png'}: "
            in res.output), res.output
    assert "; 1 left out (" in res.output
    check = json.loads((tmp_path / "m.onnx.json").read_text())["verification"]
    assert (check["images_checked"], check["images_unreadable"], check["images_left_out"]) == (3, 2, 1)
    all_good = CliRunner().invoke(app, ["export", "--model", str(run), "--out",
                                        str(tmp_path / "m.onnx"), "--images", str(imgs / "img0.png")])
    assert "checked on 1 of the given images: onnxruntime" in all_good.output, all_good.output


def test_missing_onnxruntime_is_a_clear_refusal(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(SystemExit, match="onnxruntime.*pip install"):
        export_onnx(make_run(tmp_path / "run"))


def test_the_check_finds_a_relative_data_path_from_where_the_run_ran(tmp_path, monkeypatch):
    """config.json keeps --data as typed: a relative path is read from the run's own folder
    (its recorded cwd), not from wherever export is called."""
    run = make_run(tmp_path / "run")
    write_pngs(tmp_path / "work" / "data" / "COVID", n=2)
    write_pngs(tmp_path / "work" / "data" / "Normal", n=2, seed=1)
    (run / "config.json").write_text(json.dumps({"config": {"data": {"path": "data"}},
                                                 "cwd": str(tmp_path / "work")}))
    monkeypatch.chdir(tmp_path)  # here "data" names nothing
    r = export_onnx(run)
    assert r["ok"] and r["images_checked"] == 4 and "synthetic" not in r["check_source"]


def test_the_check_stops_at_64_real_images_and_says_so(tmp_path):
    """A folder of thousands was decoded whole to keep 64, and the line said nothing of the
    rest: decoding stops at 64 and the source says how many were not checked."""
    from sstl.engine.export import MOST_IMAGES, check_images

    write_pngs(tmp_path / "many", n=MOST_IMAGES + 2)
    grey, source, unread = check_images(None, {"cache_size": 48}, (str(tmp_path / "many"),))
    assert grey.shape == (MOST_IMAGES, 48, 48) and unread == []
    assert source == f"of the given images (the first {MOST_IMAGES} readable; 2 more not checked)"
