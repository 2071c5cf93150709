"""PIRL (pirl-jigsaw, pirl-rotation): the pretext transforms against NumPy, the memory bank
and the NCE loss against float64 formulas, one step through the data seam, exact resume with
the bank, and the choice of the torch data path."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sstl.engine import loop
from sstl.engine import pretrain as pretrain_mod
from sstl.engine.config import (IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ConfigError,
                                ViewAugment, check, resolve)
from sstl.engine.data.backends import ssl_source
from sstl.engine.data.loader import step_seed
from sstl.engine.data.pretext import (PretextSource, jigsaw_sizes, jigsaw_tiles, rotate,
                                      sample_jigsaw)
from sstl.engine.data.views import sample_params
from sstl.engine.methods import PIRLConfig, PIRLJigsaw, PIRLRotation
from sstl.engine.methods.pirl import nce_loss
from sstl.engine.models import backbone
from sstl.engine.pretrain import build_method, build_trainer

from .configs import pretrain_cfg

# A view that is the whole image, unflipped, unblurred, unjittered: pixels pass through.
PLAIN = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, blur_p=0.0,
                    jitter_p=0.0)


def _grey(x: torch.Tensor) -> np.ndarray:
    """Channel 0 of normalised views back to [0, 1]."""
    return (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).numpy()


def test_jigsaw_tiles_come_from_their_cells_and_the_inverse_permutation_restores_them():
    tile, cell = 5, 7
    g = torch.Generator().manual_seed(0)
    crop = torch.rand(4, 2, 3 * cell, 3 * cell, generator=g, dtype=torch.float64)
    offsets, perm = sample_jigsaw(4, tile, cell, g, "cpu")
    assert offsets.min() >= 0 and offsets.max() <= cell - tile and len(offsets.unique()) > 1
    assert (perm.sort(1).values == torch.arange(9)).all()
    got = jigsaw_tiles(crop, offsets, perm, tile, cell).numpy().reshape(4, 9, 2, tile, tile)
    c, o, p = crop.numpy(), offsets.numpy(), perm.numpy()
    for b in range(4):
        for slot in range(9):
            src = p[b, slot]
            row, col = divmod(src, 3)
            y, x = row * cell + o[b, src, 0], col * cell + o[b, src, 1]
            np.testing.assert_array_equal(got[b, slot], c[b, :, y:y + tile, x:x + tile])
    ordered = jigsaw_tiles(crop, offsets, torch.arange(9).expand(4, 9), tile, cell)
    ordered = ordered.view(4, 9, 2, tile, tile)
    shuffled = torch.from_numpy(got)
    inverse = perm.argsort(1)
    restored = shuffled[torch.arange(4)[:, None], inverse]
    assert torch.equal(restored, ordered)
    assert not torch.equal(shuffled, ordered)  # the permutation did move tiles


def _source(pretext: str, images: np.ndarray, size: int, view2: ViewAugment = PLAIN,
            **kw) -> PretextSource:
    aug = AugmentConfig(size=size, view1=PLAIN, view2=view2)
    return PretextSource(images, aug, batch_size=3, seed=5, device="cpu", pretext=pretext, **kw)


# Per-tile draws that show: flips and a strong brightness/contrast jitter on every tile.
TILE_AUG = dataclasses.replace(PLAIN, flip_p=0.5, jitter_p=1.0)


@pytest.mark.parametrize("view2", [PLAIN, TILE_AUG], ids=["plain", "tile-augment"])
def test_jigsaw_source_tiles_are_the_source_images_pixels(view2):
    """Each tile against NumPy: its cell's pixels at its offset, in its slot, then flipped and
    jittered on its own draws (VISSL augments every patch separately). The crop is the
    jigsaw's own (here the whole image), whatever view2's scale range."""
    tile, cell = jigsaw_sizes(32)
    side = 3 * cell  # the jigsaw crop is rendered at the image's own size: pixels pass through
    images = np.random.default_rng(0).integers(0, 256, (6, side, side), dtype=np.uint8)
    view2 = dataclasses.replace(view2, crop_scale=(0.2, 1.0))  # must not reach the crop
    src = _source("jigsaw", images, 32, view2, jigsaw_crop_scale=(1.0, 1.0))
    x, x_t, idx = next(src.epoch(0, start_step=1))
    assert x.shape == (3, 3, 32, 32) and x_t.shape == (27, 3, tile, tile)
    # The step's draws, in the source's order: view1, the crop, the jigsaw's, the tiles'.
    g = torch.Generator().manual_seed(step_seed(5, 0, 1, 0))
    sample_params(3, PLAIN, g, "cpu"), sample_params(3, PLAIN, g, "cpu")
    offsets, perm = sample_jigsaw(3, tile, cell, g, "cpu")
    per_tile = sample_params(27, view2, g, "cpu")
    flip = per_tile.flip.numpy().reshape(3, 9)
    bright = per_tile.brightness.double().numpy().reshape(3, 9)
    contrast = per_tile.contrast.double().numpy().reshape(3, 9)
    tiles = _grey(x_t).reshape(3, 9, tile, tile)
    for b, i in enumerate(idx.tolist()):
        img = images[i].astype(np.float64) / 255
        for slot in range(9):
            src_cell = int(perm[b, slot])
            row, col = divmod(src_cell, 3)
            y = row * cell + int(offsets[b, src_cell, 0])
            xx = col * cell + int(offsets[b, src_cell, 1])
            want = img[y:y + tile, xx:xx + tile]
            want = want[:, ::-1] * bright[b, slot] if flip[b, slot] else want * bright[b, slot]
            want = np.clip((want - want.mean()) * contrast[b, slot] + want.mean(), 0, 1)
            np.testing.assert_allclose(tiles[b, slot], want, atol=1e-5)
    if view2 is TILE_AUG:  # the draws are the tiles' own, not one per image
        assert 0 < flip.sum() < 27 and (np.ptp(bright, axis=1) > 0.05).all()


def test_the_jigsaw_crop_takes_60_to_100_percent_of_the_image():
    """VISSL's crop scale for the patches, whatever the views' own range (20-100%)."""
    tile, cell = jigsaw_sizes(32)
    images = np.zeros((6, 3 * cell, 3 * cell), dtype=np.uint8)
    src = _source("jigsaw", images, 32, dataclasses.replace(PLAIN, crop_scale=(0.2, 1.0)))
    assert src.jigsaw_crop.crop_scale == (0.6, 1.0) and src.aug.view2.crop_scale == (0.2, 1.0)
    g = torch.Generator().manual_seed(0)
    box = sample_params(10_000, src.jigsaw_crop, g, "cpu").box
    area = box[:, 2] * box[:, 3]
    assert area.min() >= 0.6 - 1e-6 and area.max() <= 1 + 1e-6


def test_rotation_matches_np_rot90_directly_and_through_the_source():
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    k = torch.tensor([0, 1, 2, 3, 1])
    got = rotate(x, k).numpy()
    for i in range(5):
        np.testing.assert_array_equal(got[i, 0], np.rot90(x[i, 0].numpy(), int(k[i])))
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    x, x_t, idx = next(_source("rotation", images, 32).epoch(0))
    g = torch.Generator().manual_seed(step_seed(5, 0, 0, 0))
    sample_params(3, PLAIN, g, "cpu"), sample_params(3, PLAIN, g, "cpu")
    ks = torch.randint(0, 4, (3,), generator=g)
    for b, i in enumerate(idx.tolist()):
        img = images[i].astype(np.float64) / 255
        np.testing.assert_allclose(_grey(x)[b], img, atol=1e-5)
        np.testing.assert_allclose(_grey(x_t)[b], np.rot90(img, int(ks[b])), atol=1e-5)


def _model(cls=PIRLRotation, n=10, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = PIRLConfig(**{"proj_dim": 8, "tile_dim": 4, "negatives": 5, **kw})
    m = cls(backbone("resnet18"), 512, cfg)
    m.attach(n, seed=3)
    m.double()
    m.bank = F.normalize(m.bank, dim=1)  # unit to float64 precision (attach makes float32 rows)
    return m


def test_bank_starts_as_seeded_unit_rows_and_updates_by_the_formula_float64():
    m = _model()
    assert torch.allclose(m.bank.norm(dim=1), torch.ones(10, dtype=torch.float64))
    assert torch.equal(m.bank, _model().bank)  # seeded
    other = PIRLRotation(backbone("resnet18"), 512, PIRLConfig(proj_dim=8))
    other.attach(10, seed=4)
    assert not torch.allclose(other.bank.double(), m.bank)  # the seed matters
    old = m.bank.clone().numpy()
    f = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1)
    idx = torch.tensor([7, 0, 4])
    m.update_bank(idx, f)
    want = old.copy()
    for row, i in enumerate(idx.tolist()):
        v = 0.5 * old[i] + 0.5 * f[row].numpy()
        want[i] = v / np.linalg.norm(v)
    np.testing.assert_allclose(m.bank.numpy(), want, rtol=0, atol=1e-14)


def _nce_by_hand(q, bank, idx, neg, t, zbar):
    """PIRL's NCE with explicit loops: h = e^{s/t} / (e^{s/t} + K zbar)."""
    k = neg.shape[1]
    total = 0.0
    for b in range(q.shape[0]):
        def h(j):
            e = math.exp(F.cosine_similarity(q[b], bank[j], dim=0).item() / t)
            return e / (e + k * zbar)
        total += -math.log(h(int(idx[b]))) - sum(math.log(1 - h(int(j))) for j in neg[b])
    return total / q.shape[0]


def test_nce_loss_matches_hand_computation_float64():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    q = F.normalize(torch.randn(2, 4, generator=g, dtype=torch.float64), dim=1)
    idx, neg = torch.tensor([1, 4]), torch.tensor([[0, 2, 5], [3, 3, 0]])
    zbar = 1.7
    got = nce_loss(q, bank, idx, neg, 0.07, torch.tensor(math.log(3 * zbar), dtype=torch.float64))
    assert got.item() == pytest.approx(_nce_by_hand(q, bank, idx, neg, 0.07, zbar), rel=1e-12)


def test_forward_is_the_weighted_sum_of_both_nce_terms_with_the_steps_partition():
    m = _model(lam=0.3)
    twin = _model(lam=0.3)
    g = torch.Generator().manual_seed(2)
    x, x_t = (torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    idx = torch.tensor([9, 2, 5, 0])
    bank0 = m.bank.clone()
    loss, stats = m(x, x_t, idx)
    neg = twin.negatives(idx)  # the same step of the same seed: the same negatives
    assert neg.shape == (4, 5) and ((neg >= 0) & (neg < 10)).all()
    assert not (neg == idx[:, None]).any()  # never the image itself
    f = F.normalize(twin.f_head(twin.backbone(x)), dim=1)
    gq = F.normalize(twin.g_head(twin.backbone(x_t)), dim=1)
    want = 0.0
    for lam, q in ((0.3, gq), (0.7, f)):
        zbar = (q @ bank0.T / 0.07).gather(1, neg).exp().mean().item()
        want += lam * _nce_by_hand(q.detach(), bank0, idx, neg, 0.07, zbar)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    # The bank moved (rows of this batch only), and the step counter seeds the next draw.
    moved = (m.bank != bank0).any(1)
    assert moved.tolist() == [i in (9, 2, 5, 0) for i in range(10)]
    assert int(m.step) == 1 and not torch.equal(twin.negatives(idx), neg)
    assert torch.isfinite(stats["invariance"]) and torch.isfinite(stats["spread"])


def test_negatives_resume_from_the_step_buffer():
    a, b = _model(), _model()
    idx = torch.tensor([1, 2])
    a.negatives(idx), a.negatives(idx)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.negatives(idx), b.negatives(idx))


@pytest.mark.parametrize("method", ["pirl-jigsaw", "pirl-rotation"])
def test_one_step_through_the_data_seam(method):
    cfg = check(pretrain_cfg(method, batch_size=4))
    res = resolve(cfg.runtime, cfg.batch_size)
    m = build_method(cfg, res)
    images = np.random.default_rng(0).integers(0, 256, (12, 64, 64), dtype=np.uint8)
    source = ssl_source(m.views, images, cfg, res)
    m.attach(len(images), cfg.runtime.seed)
    t = build_trainer(cfg, res, m, total_steps=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, x_t, idx = batch = next(source.epoch(0))
    assert x_t.shape[0] == (36 if method == "pirl-jigsaw" else 4) and idx.shape == (4,)
    out = loop.train_step(t, batch, 0)
    assert out.shape == (3,) and torch.isfinite(out).all()
    assert not torch.equal(before["backbone.conv1.weight"], m.state_dict()["backbone.conv1.weight"])
    assert not torch.equal(before["bank"], m.bank) and m.encoder is m.backbone


def test_settings_are_checked():
    for bad, msg in (({"lam": 1.5}, "lam"), ({"bank_momentum": 1.0}, "bank_momentum"),
                     ({"negatives": 0}, "negatives"), ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ConfigError, match=msg):
            check(pretrain_cfg("pirl-jigsaw", settings=bad))
    with pytest.raises(ConfigError, match="--backend dali cannot"):
        check(pretrain_cfg("pirl-rotation", backend="dali"))
    assert check(pretrain_cfg("pirl-rotation", settings={"lam": 1.0})).settings.lam == 1.0


def test_auto_backend_picks_torch_for_pirl(tmp_path, monkeypatch):
    """--backend auto takes DALI on a GPU with DALI installed, but not for PIRL's pretext views
    (only the torch path makes them); pretrain hands resolve() its method's views."""
    from sstl.engine.data import backends

    monkeypatch.setattr(backends, "dali_available", lambda: True)  # as on a GPU machine
    assert backends.pick_backend("auto", "cuda:0") == "dali"
    assert backends.pick_backend("auto", "cuda:0", "pirl-rotation") == "torch"
    assert backends.pick_backend("auto", "cpu") == "torch"
    real, asked = pretrain_mod.resolve, []
    monkeypatch.setattr(pretrain_mod, "resolve",
                        lambda rt, bs, views: asked.append(views) or real(rt, bs, views))
    run = pretrain_mod.pretrain(pretrain_cfg("pirl-rotation", out=str(tmp_path), name="r",
                                             batch_size=8, test_fraction=0.8))
    assert asked == ["pirl-rotation"]
    assert json.loads((run / "config.json").read_text())["resolved"]["backend"] == "torch"


def _cfg(tmp_path, name):  # ~51 training images of the demo set: 6 steps of 8 per epoch
    return pretrain_cfg("pirl-jigsaw", out=str(tmp_path), name=name, epochs=2, log_every=1,
                        checkpoint_every=2, batch_size=8, test_fraction=0.8)


def test_mid_epoch_resume_is_bitwise_exact_bank_included(tmp_path, monkeypatch):
    full = pretrain_mod.pretrain(_cfg(tmp_path, "full"))
    real, calls = loop.train_step, {"n": 0}

    def killed_at_step_9(*a):  # epoch 2, step 3 (6 steps per epoch); last checkpoint: step 2
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(loop, "train_step", killed_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mod.pretrain(_cfg(tmp_path, "resumed"))
    monkeypatch.setattr(loop, "train_step", real)
    resumed = pretrain_mod.pretrain(_cfg(tmp_path, "resumed"))
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and {"bank", "step"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["step"]) == 12
    fresh = PIRLJigsaw(backbone("resnet18"), 512, PIRLConfig(proj_dim=32))
    fresh.attach(a["bank"].shape[0], seed=0)
    assert not torch.equal(fresh.bank, a["bank"])  # the bank the checkpoints compare has moved
    assert torch.allclose(a["bank"].norm(dim=1), torch.ones(a["bank"].shape[0]))


def test_pirl_refuses_torchrun_and_the_others_accept_it(monkeypatch):
    """Each process would update only its own images' bank rows: PIRL runs in one process."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for method in ("pirl-jigsaw", "pirl-rotation"):
        with pytest.raises(ConfigError, match="runs in one process only"):
            check(pretrain_cfg(method))
    assert check(pretrain_cfg("cross")).method == "cross"
