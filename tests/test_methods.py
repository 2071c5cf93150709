"""BYOL, SimSiam and SimCLR beside Cross: each loss against a float64 hand computation, the
stop-gradient and the target network's EMA, and one protocol for all (the METHODS table)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sstl import kernels
from sstl.engine.config import ConfigError, check, resolve
from sstl.engine.data.backends import ssl_source
from sstl.engine.loop import train_step
from sstl.engine.methods import METHODS, BYOL, BYOLConfig, SimSiam, SimSiamConfig, method_settings
from sstl.engine.methods.base import cosine_tau
from sstl.engine.methods.simclr import nt_xent
from sstl.engine.models import backbone
from sstl.engine.pretrain import build_method, build_trainer

from .configs import pretrain_cfg


def _cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cosine_loss_matches_hand_computation_float64(backend, monkeypatch):
    monkeypatch.setenv("SSTL_KERNELS", backend)
    if backend == "triton" and not kernels.triton_available("cpu"):
        pytest.skip("triton (interpreter) unavailable")
    dtype = torch.float64 if backend == "reference" else torch.float32  # the interpreter: fp32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(9, 37, generator=g, dtype=dtype) for _ in range(2))
    a[3] = 0  # a zero row: finite loss and gradient, as F.normalize gives
    a.requires_grad_(True)
    b.requires_grad_(True)
    got = kernels.cosine_loss(a, b)
    want = kernels.cosine_loss_reference(a, b)
    by_hand = (2 - 2 * torch.nan_to_num(_cos(a, b))).mean()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want.to(got.dtype), **tol)
    torch.testing.assert_close(got, by_hand.to(got.dtype), **tol)
    (ga,) = torch.autograd.grad(got, a)
    (wa,) = torch.autograd.grad(want, a)
    torch.testing.assert_close(ga, wa, **tol)
    assert torch.isfinite(ga).all()
    got2 = kernels.cosine_loss(a, b)
    got2.backward()
    assert b.grad is None  # the regressed side never receives a gradient


def test_byol_loss_is_symmetric_and_regresses_the_other_views_target():
    torch.manual_seed(0)
    m = BYOL(backbone("resnet18"), 512, BYOLConfig(proj_hidden=32, proj_dim=16, pred_hidden=32))
    m.double()
    v1, v2 = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    loss, _ = m(v1, v2)
    m2 = m  # recompute by hand from the same modules, in the same (train) mode
    p1, p2 = m2.predictor(m2.projector(m2.backbone(torch.cat([v1, v2])))).chunk(2)
    with torch.no_grad():
        z1, z2 = m2.target(torch.cat([v1, v2])).chunk(2)
    want = (2 - 2 * _cos(p1, z2)).mean() + (2 - 2 * _cos(p2, z1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-10)


def test_byol_target_starts_equal_and_follows_the_ema_formula():
    cfg = check(pretrain_cfg("byol", settings={"tau": 0.9}))
    res = resolve(cfg.runtime, cfg.batch_size)
    m = build_method(cfg, res)
    online, target = m.ema_pairs()
    for o, t in zip(online, target):
        assert torch.equal(o, t) and not t.requires_grad
    t = build_trainer(cfg, res, m, total_steps=4)
    before = [x.detach().clone() for x in target]
    train_step(t, (torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)), 1)
    tau = cosine_tau(0.9, 1, 4)
    assert tau == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    for x, x0, o in zip(target, before, online):
        torch.testing.assert_close(x, tau * x0 + (1 - tau) * o.detach(), rtol=1e-6, atol=1e-7)
    # ... and the online weights had moved (from the equal start, a skipped step would leave
    # target == online and the formula above true).
    assert any(not torch.equal(x, x0) for x, x0 in zip(target, before))
    assert cosine_tau(0.996, 0, 10) == pytest.approx(0.996) and cosine_tau(0.996, 10, 10) == 1


def test_simsiam_stop_gradient_and_loss():
    torch.manual_seed(0)
    m = SimSiam(backbone("resnet18"), 512, SimSiamConfig(proj_dim=32, pred_hidden=8)).double()
    v1, v2 = (torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(2))
    loss, _ = m(v1, v2)
    z = m.projector(m.backbone(torch.cat([v1, v2])))
    p1, p2 = m.predictor(z).chunk(2)
    z1, z2 = z.chunk(2)
    # The paper's L = -cos(P1, sg Z2)/2 - cos(P2, sg Z1)/2, plus 1 (so 0 at agreement): its
    # scale, hence its gradients, exactly (the shared SGD settings then mean what they say).
    want = 1 - (_cos(p1, z2.detach()).mean() + _cos(p2, z1.detach()).mean()) / 2
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-10)
    # The stop-gradient: the loss's gradient reaches z only through the predictor branch.
    zz = z.detach().requires_grad_(True)
    q1, q2 = m.predictor(zz).chunk(2)
    y1, y2 = zz.chunk(2)
    through_pred = -(_cos(q1, y2.detach()).mean() + _cos(q2, y1.detach()).mean()) / 2
    with_target = -(_cos(q1, y2).mean() + _cos(q2, y1).mean()) / 2
    g_stop = torch.autograd.grad(through_pred, zz, retain_graph=True)[0]
    g_full = torch.autograd.grad(with_target, zz)[0]
    assert not torch.allclose(g_stop, g_full)  # the oracle can tell the two apart
    # The method's own backward: the gradient its loss sends into its projector's output.
    seen = []

    def keep(module, inputs, out):  # returns None: the output is left as it is
        out.retain_grad()
        seen.append(out)
    m.projector.register_forward_hook(keep)
    m(v1, v2)[0].backward()
    [z_method] = seen
    torch.testing.assert_close(z_method, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_method.grad, g_stop, rtol=1e-8, atol=1e-10)
    assert m.ema_pairs() == ([], [])  # no target network


def nt_xent_direct(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent written out as in the SimCLR paper: l(i, j) for every positive pair, averaged."""
    z = torch.cat([z1, z2])
    n, b = z.shape[0], z1.shape[0]
    sim = lambda i, j: F.cosine_similarity(z[i], z[j], dim=0) / t  # noqa: E731
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        denom = sum(torch.exp(sim(i, k)) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(sim(i, j)) / denom)
    return total / n


def test_nt_xent_matches_the_papers_formula():
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = nt_xent(torch.cat([z1, z2]).double(), 0.1)
    torch.testing.assert_close(got.double(), nt_xent_direct(z1, z2, 0.1), rtol=1e-6, atol=1e-8)


def test_nt_xent_stays_float32_under_bf16_autocast():
    """The step runs under bf16 autocast on a GPU; there z @ z.T ran in bf16 and put ~1e-2
    on the gradient. Oracle: float64 autograd of the same loss (CPU autocast, same ops)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(64, 32, generator=g) + 2.0  # rows pointing one way, as an early projector
    z64 = z.double().requires_grad_(True)
    zn = F.normalize(z64, dim=1)
    logits = (zn @ zn.T / 0.1).masked_fill(torch.eye(64, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, torch.arange(64).roll(32))
    want = torch.autograd.grad(ref, z64)[0]
    z32 = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward, as step_body runs it
        loss = nt_xent(z32, 0.1)
    got = torch.autograd.grad(loss, z32)[0]
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-4


def test_every_method_is_one_step_on_the_same_protocol():
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64), dtype=np.uint8)
    for name in METHODS:
        cfg = check(pretrain_cfg(name, batch_size=4))
        res = resolve(cfg.runtime, cfg.batch_size)
        m = build_method(cfg, res)
        source = ssl_source(m.views, images, cfg, res)  # the batch its data seam makes
        m.attach(len(images), cfg.runtime.seed)
        t = build_trainer(cfg, res, m, total_steps=2)
        out = train_step(t, next(source.epoch(0)), 0)
        assert out.shape == (1 + len(m.stats),) and torch.isfinite(out).all(), name
        assert m.encoder is m.backbone


def test_method_settings_convert_and_refuse():
    assert method_settings("byol", {"tau": "0.99"}).tau == 0.99
    assert method_settings("simclr", {"temperature": 0.5}).temperature == 0.5
    with pytest.raises(ValueError, match="no setting 'temprature'"):
        method_settings("simclr", {"temprature": 0.5})
    with pytest.raises(ValueError, match="must be one of"):
        method_settings("moco", {})
    with pytest.raises(ConfigError, match="--tau must be in"):
        check(pretrain_cfg("cross", settings={"tau": 1.5}))
