"""Grad-CAM (engine/explain.py): the map's size, where it peaks, and `sstl predict --cam`."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("pytorch_grad_cam")

from sstl.engine.explain import cam_maps, gradcam_overlays  # noqa: E402
from sstl.engine.models import load_classifier  # noqa: E402
from tests.tiny_run import make_run, write_pngs  # noqa: E402


class BrightnessNet(nn.Module):
    """`layer4` maps brightness to activation (positive weights, stride 4); the head's class 1
    logit is the mean activation times 5, class 0 its negative: class 1's evidence is light."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv2d(3, 2, 4, stride=4), nn.ReLU())
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.layer4[0].weight.fill_(1 / 48)
            self.layer4[0].bias.fill_(3.0)  # normalised inputs go down to -2.1: keep ReLU open
            self.head.weight.copy_(torch.tensor([[-5.0, -5.0], [5.0, 5.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.layer4(x).mean((2, 3)))


def test_cam_peaks_inside_the_planted_square():
    rng = np.random.default_rng(0)
    img = rng.integers(20, 60, size=(1, 64, 64)).astype(np.uint8)
    img[0, 36:52, 8:24] = 230  # the planted bright square
    maps, classes = cam_maps(BrightnessNet(), img, 64, 1)
    assert maps.shape == (1, 64, 64) and list(classes) == [1]
    y, x = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 36 <= y < 52 and 8 <= x < 24, (y, x)
    inside, outside = maps[0, 36:52, 8:24].mean(), np.delete(maps[0], np.s_[36:52], 0).mean()
    assert inside > 0.8 and outside < 0.2


def test_cam_map_has_the_image_size(tmp_path):
    model, meta = load_classifier(make_run(tmp_path / "run", image_size=32))
    imgs = np.random.default_rng(1).integers(0, 255, size=(2, 48, 48)).astype(np.uint8)
    maps, classes = cam_maps(model, imgs, meta["image_size"], None)
    assert maps.shape == (2, 48, 48) and maps.min() >= 0 and maps.max() <= 1
    with torch.no_grad():
        from sstl.engine.data.views import eval_view
        want = model(eval_view(torch.from_numpy(imgs), 32)).argmax(1).numpy()
    np.testing.assert_array_equal(classes, want)  # None explains the predicted class
    paths = gradcam_overlays(model, imgs, 32, 0, tmp_path / "cam", ["a", "b"], "cpu")
    assert [p.name for p in paths] == ["a.png", "b.png"]
    with Image.open(paths[0]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_predict_cam_writes_one_overlay_per_readable_image(tmp_path):
    from typer.testing import CliRunner

    from sstl.cli.main import app

    run = make_run(tmp_path / "run")
    imgs = write_pngs(tmp_path / "imgs", n=3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "imgs"), "--model", str(run),
                                 "--out-csv", str(tmp_path / "p.csv"), "--cam",
                                 str(tmp_path / "cam"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    written = sorted(p.name for p in (tmp_path / "cam").iterdir())
    assert len(written) == 3 and all(n.split("-")[1] in {p.stem for p in imgs} for n in written)


def test_cam_files_are_named_safely_and_a_cam_failure_keeps_every_prediction(tmp_path,
                                                                             monkeypatch):
    """A class named "Pneumonia/bacterial" must not point a file name into a missing folder;
    and whatever fails in Grad-CAM, the predictions are written and the exit is non-zero."""
    from typer.testing import CliRunner

    from sstl.cli.main import app
    from sstl.engine import explain

    names = ["COVID", "Pneumonia/bacterial"]
    run = make_run(tmp_path / "run", class_names=names)
    write_pngs(tmp_path / "imgs", n=4)
    args = ["predict", str(tmp_path / "imgs"), "--model", str(run), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--out-csv", str(tmp_path / "p.csv"),
                                 "--cam", str(tmp_path / "cam")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "cam").glob("*.png"))) == 4

    def broken(*a, **k):
        raise RuntimeError("no gradient reached layer4")

    monkeypatch.setattr(explain, "gradcam_overlays", broken)
    r = CliRunner().invoke(app, [*args, "--out-csv", str(tmp_path / "q.csv"),
                                 "--cam", str(tmp_path / "cam2")])
    assert r.exit_code not in (0, None) and "Grad-CAM failed for 4 images" in r.output
    assert (tmp_path / "q.csv").read_text().count("\n") == 5  # header + every image
