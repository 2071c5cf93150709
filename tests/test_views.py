"""The view paths. Oracles: a NumPy reference of views.render, epoch-plan properties, and
agreement of the DALI path (CPU mode) with both the reference and the torch path."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sstl.engine.config import (IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, FinetuneAugment,
                                ViewAugment)
from sstl.engine.data import dali as dali_mod
from sstl.engine.data.backends import pick_backend
from sstl.engine.data.loader import LabelledSource, TwoViewSource, epoch_order
from sstl.engine.data.views import (ViewParams, blur_radius, eval_view, render, sample_params,
                                    two_views)

needs_dali = pytest.mark.skipif(dali_mod.IMPORT_ERROR is not None,
                                reason=f"NVIDIA DALI is not importable: {dali_mod.IMPORT_ERROR}")
MEAN = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
AUG = ViewAugment(blur_sigma=(0.1, 2.0))  # radius 6: the window both paths use
# Fixed parameters: full box (a plain resize), upscaling and downscaling crops, edges, a
# flip, no blur and sigma 1.3, with and without jitter.
CASES = [  # box (x0, y0, w, h), flip, sigma, brightness, contrast
    ((0.0, 0.0, 1.0, 1.0), False, 0.0, 1.0, 1.0),
    ((0.1, 0.2, 0.5, 0.6), False, 1.3, 1.0, 1.0),
    ((0.5, 0.4, 0.5, 0.6), True, 0.0, 1.2, 0.7),
    ((0.0, 0.3, 0.3, 0.7), True, 1.3, 0.8, 1.3),
    ((0.05, 0.0, 0.95, 0.9), False, 1.3, 1.1, 1.0),
]


def _images(n=6, s=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, s), dtype=np.uint8)


def _params(cases=CASES) -> ViewParams:
    col = lambda i: torch.tensor([c[i] for c in cases], dtype=torch.float32)  # noqa: E731
    return ViewParams(box=col(0), flip=torch.tensor([c[1] for c in cases]), sigma=col(2),
                      brightness=col(3), contrast=col(4))


def ref_render(img: np.ndarray, box, flip, sigma, b, c, radius: int, v: int) -> np.ndarray:
    """NumPy reference of views.render for one image, written from the conventions alone."""
    src = img.astype(np.float64) / 255.0
    h_src, w_src = src.shape
    t = (np.arange(v) + 0.5) / v
    x0, y0, w, h = box

    def taps(coord, n):  # pixel centres at i + 0.5, border-clamped bilinear taps
        p = np.clip(coord * n - 0.5, 0, n - 1)
        i0 = np.floor(p).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), p - i0

    xa, xb, fx = taps(x0 + ((1 - t) if flip else t) * w, w_src)
    ya, yb, fy = taps(y0 + t * h, h_src)
    rows = src[ya] * (1 - fy)[:, None] + src[yb] * fy[:, None]
    x = rows[:, xa] * (1 - fx) + rows[:, xb] * fx
    if sigma > 0:
        k = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
        k /= k.sum()
        pad = np.pad(x, radius, mode="reflect")
        x = np.stack([np.convolve(r, k, mode="valid") for r in pad])  # along x
        x = np.stack([np.convolve(col, k, mode="valid") for col in x.T]).T  # along y
    x = x * b
    return np.clip((x - x.mean()) * c + x.mean(), 0, 1)


def _grey(views: torch.Tensor) -> np.ndarray:
    """Normalised 3-channel views back to grey in [0, 1], (B, 3, H, W)."""
    return views.float().numpy() * STD + MEAN


# ---------------------------------------------------------------- the torch path (views.py)

@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, True)])
def test_two_views_shape_dtype_layout_range(dtype, channels_last):
    imgs = torch.from_numpy(_images())
    v1, v2 = two_views(imgs, AugmentConfig(size=24), torch.Generator().manual_seed(0), dtype,
                       channels_last)
    for v in (v1, v2):
        assert v.shape == (6, 3, 24, 24) and v.dtype == dtype
        assert v.is_contiguous(memory_format=torch.channels_last) == channels_last
        g = _grey(v)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert g.min() >= -tol and g.max() <= 1 + tol
        assert np.abs(g - g[:, :1]).max() <= tol  # three copies of one grey channel
    assert not torch.equal(v1, v2)  # the two views of an image differ


def test_two_views_deterministic_from_generator():
    imgs, aug = torch.from_numpy(_images()), AugmentConfig(size=24)
    run = lambda s: two_views(imgs, aug, torch.Generator().manual_seed(s))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_sample_params_ranges_and_rates():
    aug = ViewAugment(crop_scale=(0.3, 0.6), blur_p=0.25, flip_p=0.5, jitter_p=0.8)
    p = sample_params(20000, aug, torch.Generator().manual_seed(0), "cpu")
    x0, y0, w, h = p.box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 0.6 + 1e-4  # no box clamps at this scale
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert abs(p.flip.float().mean() - 0.5) < 0.02
    blurred = p.sigma > 0
    assert abs(blurred.float().mean() - 0.25) < 0.02
    assert p.sigma[blurred].min() >= 0.1 and p.sigma.max() <= 2.0
    jittered = (p.brightness != 1) | (p.contrast != 1)
    assert abs(jittered.float().mean() - 0.8) < 0.02
    assert p.brightness.min() >= 0.6 and p.brightness.max() <= 1.4


@pytest.mark.parametrize("size", [24, 48])
def test_render_matches_numpy_reference(size):
    imgs, p = _images(len(CASES)), _params()
    got = render(torch.from_numpy(imgs), p, AUG, size)[:, 0].numpy()
    for i, (box, flip, sigma, b, c) in enumerate(CASES):
        want = ref_render(imgs[i], box, flip, sigma, b, c, blur_radius(AUG), size)
        np.testing.assert_allclose(got[i], want, atol=1e-4, err_msg=f"case {i}")


def test_full_box_is_a_plain_resize():
    imgs = _images(2)
    full = _params([CASES[0]] * 2)
    same = render(torch.from_numpy(imgs), full, AUG, 32)[:, 0].numpy()
    np.testing.assert_allclose(same, imgs / 255.0, atol=1e-6)  # same size: the identity
    half = render(torch.from_numpy(imgs), full, AUG, 16)[:, 0].numpy()
    blocks = imgs.reshape(2, 16, 2, 16, 2).mean(axis=(2, 4)) / 255.0  # centres fall between pixels
    np.testing.assert_allclose(half, blocks, atol=1e-6)


def test_eval_view_deterministic_and_plain():
    imgs = torch.from_numpy(_images())
    a, b = eval_view(imgs, 24), eval_view(imgs, 24)
    assert torch.equal(a, b) and a.shape == (6, 3, 24, 24)
    np.testing.assert_allclose(_grey(eval_view(imgs, 32))[:, 0], imgs.numpy() / 255.0, atol=1e-6)


# ---------------------------------------------------------------- the DALI path (dali.py)

def _dali_render(imgs: np.ndarray, p: ViewParams, aug: ViewAugment, size: int) -> np.ndarray:
    """Run dali.view_graph once on the CPU with the given parameters as external inputs."""
    from nvidia.dali import Pipeline, fn

    inputs = [imgs[..., None], *dali_mod.dali_args(p, aug)]
    pipe = Pipeline(batch_size=len(imgs), num_threads=1, device_id=None)
    with pipe:
        nodes = fn.external_source(source=lambda: inputs, num_outputs=len(inputs), batch=True,
                                   layout=["HWC"] + [""] * (len(inputs) - 1))
        args = dali_mod.split_inputs(nodes[1:], [aug])[0]
        pipe.set_outputs(dali_mod.view_graph(nodes[0], args, aug, size))
    return np.array(pipe.run()[0].as_tensor())[..., 0] / 255.0


@needs_dali
@pytest.mark.parametrize("size", [24, 48])
def test_dali_matches_numpy_reference(size):
    # Like with like: DALI resizes without antialiasing (as torch's grid_sample), with the
    # same blur window and border. What is left is float32 rounding in DALI's resampling
    # (measured ~2e-6); 1e-4 leaves room and is 40x below one grey level.
    imgs, p = _images(len(CASES)), _params()
    got = _dali_render(imgs, p, AUG, size)
    for i, (box, flip, sigma, b, c) in enumerate(CASES):
        want = ref_render(imgs[i], box, flip, sigma, b, c, blur_radius(AUG), size)
        np.testing.assert_allclose(got[i], want, atol=1e-4, err_msg=f"case {i}")


@needs_dali
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_dali_two_views_agree_with_torch_path(dtype, channels_last):
    # On a CPU device both paths draw the same numbers, so whole epochs must agree (1e-4 of the
    # grey range, see above; bf16 adds its own rounding, identical on both sides).
    imgs, aug = _images(20), AugmentConfig(size=24)
    layout = dict(dtype=dtype, channels_last=channels_last)
    ours = dali_mod.DaliTwoViewSource(imgs, aug, 4, 7, "cpu", **layout)
    ref = TwoViewSource(imgs, aug, 4, 7, "cpu", **layout)
    n = 0
    for (a1, a2), (b1, b2) in zip(ours.epoch(3), ref.epoch(3)):
        for a, b in ((a1, b1), (a2, b2)):
            assert a.shape == b.shape and a.dtype == dtype
            assert a.is_contiguous(memory_format=torch.channels_last) == channels_last
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert np.abs(_grey(a) - _grey(b)).max() <= tol
        n += 1
    assert n == ours.steps_per_epoch == 5


@needs_dali
def test_dali_two_views_of_a_shard_agree_with_the_torch_path():
    """Under torchrun each rank keeps its rows of the global batch's draws: DALI's rank r of 2
    must give the views the torch path gives that rank (and so one process would give)."""
    imgs, aug = _images(20), AugmentConfig(size=24)
    for rank in (0, 1):
        ours = dali_mod.DaliTwoViewSource(imgs, aug, 4, 7, "cpu", rank, 2)
        ref = TwoViewSource(imgs, aug, 4, 7, "cpu", rank, 2)
        pairs = list(zip(ours.epoch(1), ref.epoch(1)))
        assert len(pairs) == ours.steps_per_epoch == 2
        for (a1, a2), (b1, b2) in pairs:
            for a, b in ((a1, b1), (a2, b2)):
                assert np.abs(_grey(a) - _grey(b)).max() <= 1e-4


@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for DALI's GPU mode")
@pytest.mark.parametrize("from_files", [False, True], ids=["cache", "files"])
def test_dali_gpu_matches_cpu_mode(tmp_path, from_files):
    # Both modes are fed the same host-drawn numbers. Cache: GPU float arithmetic only (1e-3);
    # files: also the decoded image's uint8 resize to the cache side may round apart (1 level).
    imgs = _images(16)
    files = [str(tmp_path / f"{i}.png") for i in range(len(imgs))]
    for f, img in zip(files, imgs):
        Image.fromarray(img).save(f)
    data, tol = (files, 1.5 / 255) if from_files else (imgs, 1e-3)
    gpu, cpu = (dali_mod.DaliTwoViewSource(data, AugmentConfig(size=24), 4, 1, dev, cache_size=32)
                for dev in ("cuda", "cpu"))
    for (a1, a2), (b1, b2) in zip(gpu.epoch(0), cpu.epoch(0)):
        assert a1.is_cuda and not b1.is_cuda
        for a, b in ((a1, b1), (a2, b2)):
            assert np.abs(_grey(a.cpu()) - _grey(b)).max() <= tol


def _tagged(tmp_path, n=42, s=32):
    """n constant images, image i of grey value 10 + 5 i: the tag survives crop, flip, blur."""
    tags = 10 + 5 * np.arange(n)
    imgs = np.broadcast_to(tags[:, None, None], (n, s, s)).astype(np.uint8)
    files = []
    for i, img in enumerate(imgs):
        files.append(str(tmp_path / f"{i:03d}.png"))
        Image.fromarray(img).save(files[-1])
    return imgs, files, tags


def _tags_of(view: torch.Tensor) -> np.ndarray:
    g = _grey(view) * 255
    assert np.ptp(g, axis=(1, 2, 3)).max() < 0.5  # still constant
    return np.rint(g[:, 0, 0, 0]).astype(int)


NO_JITTER = AugmentConfig(size=16, view1=ViewAugment(blur_p=1.0, jitter_p=0.0),
                          view2=ViewAugment(blur_p=0.1, jitter_p=0.0))


@needs_dali
@pytest.mark.parametrize("from_files", [False, True], ids=["cache", "files"])
def test_dali_epoch_covers_each_image_once_and_shards(tmp_path, from_files):
    imgs, files, tags = _tagged(tmp_path)
    data = files if from_files else imgs
    n, batch, seed = len(imgs), 4, 5
    used = (n // (batch * 2)) * batch * 2  # two shards: whole global batches, 40 of 42
    for epoch in (0, 1):
        order = epoch_order(n, seed, epoch).numpy()
        seen = []
        for rank in (0, 1):
            src = dali_mod.DaliTwoViewSource(data, NO_JITTER, batch, seed, "cpu", rank, 2,
                                             cache_size=32)
            got = [(_tags_of(v1), _tags_of(v2)) for v1, v2 in src.epoch(epoch)]
            want = tags[order[:used][rank::2]].reshape(-1, batch)
            assert len(got) == src.steps_per_epoch == len(want)
            for (t1, t2), w in zip(got, want):  # both views of the same images, in plan order
                assert (t1 == w).all() and (t2 == w).all()
            seen.append(set(want.ravel()))
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(tags[order[:used]])
    assert (epoch_order(n, seed, 0) != epoch_order(n, seed, 1)).any()  # reshuffled


@needs_dali
def test_dali_resume_mid_epoch_replays_the_same_batches():
    imgs = _images(24)
    src = dali_mod.DaliTwoViewSource(imgs, AugmentConfig(size=16), 4, 3, "cpu")
    full = list(src.epoch(2))
    next(iter(src.epoch(5)))  # an abandoned epoch must not leak into the next one
    resumed = list(src.epoch(2, start_step=3))
    assert len(full) == 6 and len(resumed) == 3
    for (a1, a2), (b1, b2) in zip(full[3:], resumed):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert list(src.epoch(2, start_step=6)) == []


@needs_dali
@pytest.mark.parametrize("from_files", [False, True], ids=["cache", "files"])
def test_dali_labelled_train_every_image_once_with_its_label(tmp_path, from_files):
    imgs, files, tags = _tagged(tmp_path, n=21)
    aug = ViewAugment(crop_scale=(0.6, 1.0), blur_p=0.0, jitter_p=0.0)
    src = dali_mod.DaliLabelledSource(files if from_files else imgs, tags, 8, 16, "cpu", aug,
                                      seed=2, cache_size=32)
    batches = list(src.epoch(1))
    assert [len(y) for _, y in batches] == [8, 8, 5]  # the last partial batch is kept
    assert all(y.dtype == torch.int64 for _, y in batches)
    got = np.concatenate([_tags_of(x) for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert (got == labels).all() and (labels == tags[epoch_order(21, 2, 1).numpy()]).all()


@needs_dali
def test_dali_labelled_agrees_with_torch_and_eval_is_deterministic():
    imgs, targets = _images(20), np.arange(20) % 3
    finetune = ViewAugment(crop_scale=(0.6, 1.0), blur_p=0.0, jitter_p=0.5)
    for train_aug in (finetune, None):
        ours = dali_mod.DaliLabelledSource(imgs, targets, 8, 24, "cpu", train_aug, seed=1)
        ref = LabelledSource(imgs, targets, 8, 24, "cpu", train_aug, seed=1)
        first = list(ours.epoch(0))
        for (x, y), (x2, y2) in zip(first, ref.epoch(0)):
            assert torch.equal(y, y2)
            diff = np.abs(_grey(x) - _grey(x2))
            if train_aug is not None:
                assert diff.max() <= 1e-4
            else:  # antialiased downscale: only the outermost pixels differ (module header)
                assert diff[..., 1:-1, 1:-1].max() <= 1e-4
        if train_aug is None:  # the evaluation pass: in index order, identical every time
            assert torch.equal(torch.cat([y for _, y in first]), torch.from_numpy(targets))
            for (x, _), (x2, _) in zip(first, ours.epoch(1)):
                assert torch.equal(x, x2)


@needs_dali
@pytest.mark.parametrize("n,batch", [(5, 1), (5, 2), (21, 4)])
def test_dali_labelled_shards_take_as_many_steps_as_the_torch_path(n, batch):
    """Under torchrun every rank must run as many steps (DDP's all-reduce waits for all);
    the torch path pads the order to a multiple of the world size, DALI must too."""
    imgs, targets = _images(n), np.arange(n)
    aug = ViewAugment(crop_scale=(0.6, 1.0), blur_p=0.0, jitter_p=0.0)
    for rank in (0, 1):
        ours = dali_mod.DaliLabelledSource(imgs, targets, batch, 24, "cpu", aug, seed=3,
                                           rank=rank, world_size=2)
        ref = LabelledSource(imgs, targets, batch, 24, "cpu", aug, seed=3, rank=rank,
                             world_size=2)
        got, want = [y for _, y in ours.epoch(0)], [y for _, y in ref.epoch(0)]
        assert len(got) == len(want) == ref.steps_per_epoch
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("n,world", [(2, 5), (1, 3), (7, 2), (6, 3)])
def test_every_rank_gets_as_many_training_batches_even_with_fewer_images_than_ranks(n, world):
    """A 1% subset can hold fewer images than there are processes: the order is repeated until
    every rank has as many images (DDP's collectives need as many steps on every rank)."""
    imgs, targets = _images(n), np.arange(n)
    aug = ViewAugment(crop_scale=(0.6, 1.0), blur_p=0.0, jitter_p=0.0)
    seen, counts = set(), []
    for rank in range(world):
        src = LabelledSource(imgs, targets, 4, 24, "cpu", aug, seed=1, rank=rank,
                             world_size=world)
        batches = [y for _, y in src.epoch(0)]
        counts.append([len(y) for y in batches])
        assert len(batches) == src.steps_per_epoch
        seen |= {int(t) for y in batches for t in y}
    assert all(c == counts[0] for c in counts) and seen == set(range(n)), counts


def test_missing_dali_is_a_clear_message_and_torch_still_works():
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import numpy as np\n"
            "from sstl.engine.config import AugmentConfig\n"
            "from sstl.engine.data import dali\n"
            "from sstl.engine.data.loader import TwoViewSource\n"
            "imgs = np.zeros((8, 32, 32), np.uint8)\n"
            "next(iter(TwoViewSource(imgs, AugmentConfig(size=16), 4, 0, 'cpu').epoch(0)))\n"
            "dali.DaliTwoViewSource(imgs, AugmentConfig(size=16), 4, 0, 'cpu')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "needs NVIDIA DALI" in out.stderr and "--backend torch" in out.stderr
    assert pick_backend("auto", "cpu") == "torch"


@pytest.mark.parametrize("n, batch, steps, sizes", [(10, 3, 3, [3, 3, 3]), (9, 3, 3, [3, 3, 3]),
                                                    (11, 3, 4, [3, 3, 3, 2]), (2, 4, 1, [2])])
def test_a_training_epoch_never_ends_on_a_batch_of_one(n, batch, steps, sizes):
    """BatchNorm cannot train on one image (a 1 x 1 map at a small --image-size): that step is
    skipped, and the reshuffled order leaves out another image each epoch."""
    imgs = np.random.default_rng(0).integers(0, 255, (n, 40, 40), dtype=np.uint8)
    ids = np.arange(n)  # the "label" of each image is its index: batches say what they hold
    src = LabelledSource(imgs, ids, batch, 32, "cpu", FinetuneAugment().train)
    dropped = []
    for epoch in range(3):
        batches = [y.tolist() for _, y in src.epoch(epoch)]
        assert src.steps_per_epoch == steps and [len(y) for y in batches] == sizes
        seen = sorted(sum(batches, []))
        assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))
        dropped += sorted(set(range(n)) - set(seen))
    assert len(dropped) == (3 if n % batch == 1 else 0) and len(set(dropped)) == len(dropped)
    evaluation = LabelledSource(imgs, ids, batch, 32, "cpu")
    assert sorted(sum((y.tolist() for _, y in evaluation.epoch(0)), [])) == list(range(n))


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    """Oracle: torchvision's RandomResizedCrop.get_params (BYOL's crop) on a square image.
    Boxes that do not fit are drawn again, not clamped: clamping made near-whole crops 2.5x
    as frequent as torchvision's."""
    from torchvision.transforms import RandomResizedCrop

    aug, n, side = ViewAugment(crop_scale=(0.2, 1.0)), 20_000, 1000
    box = sample_params(n, aug, torch.Generator().manual_seed(0), "cpu").box
    area = (box[:, 2] * box[:, 3]).numpy()
    torch.manual_seed(0)
    img = torch.zeros(1, side, side)
    ref = np.array([h * w / side ** 2 for _, _, h, w in (
        RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(n))])
    assert abs(area.mean() - ref.mean()) < 0.01, (area.mean(), ref.mean())
    assert abs((area > 0.9).mean() - (ref > 0.9).mean()) < 0.01
    assert (box[:, 2] <= 1).all() and (box[:, 3] <= 1).all()
    ratio = (box[:, 2] / box[:, 3]).numpy()
    whole = (box[:, 2] == 1) & (box[:, 3] == 1)  # the fallback, as torchvision's
    assert ((ratio >= 3 / 4 - 1e-5) & (ratio <= 4 / 3 + 1e-5) | whole.numpy()).all()
