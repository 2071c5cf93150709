"""Cross, the paper's method: loss, target network, EMA and momentum BN.

Oracles: float64 hand computations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sstl import kernels
from sstl.engine.config import check, resolve
from sstl.engine.loop import train_step
from sstl.engine.methods import Cross, CrossConfig
from sstl.engine.methods.base import spread
from sstl.engine.methods.cross import MomentumBatchNorm
from sstl.engine.models import backbone
from sstl.engine.pretrain import build_trainer

from .configs import pretrain_cfg


def _cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_loss_matches_hand_computation_float64():
    g = torch.Generator().manual_seed(0)
    p1, p2, y2 = (torch.randn(7, 13, generator=g, dtype=torch.float64) for _ in range(3))
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    want = ((2 - 2 * _cos(p1, p2)) + (2 - 2 * _cos(p2, y2))).mean()
    got = kernels.cross_loss(p1, p2, y2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, (p1, p2))
    g_want = torch.autograd.grad(want, (p1, p2))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _small_method(target_bn="momentum", tau=0.996):
    torch.manual_seed(0)
    return Cross(backbone("resnet18"), 512, CrossConfig(proj_hidden=32, proj_dim=16, pred_hidden=64,
                                                        target_bn=target_bn, tau=tau))


def _online(m):
    return nn.Sequential(m.backbone, m.projector)


def test_target_starts_equal_and_frozen():
    m = _small_method()
    for (n_o, p_o), (n_t, p_t) in zip(_online(m).named_parameters(), m.target.named_parameters()):
        assert n_o == n_t and torch.equal(p_o, p_t)
        assert not p_t.requires_grad and p_o.requires_grad
    for b_o, b_t in zip(_online(m).buffers(), m.target.buffers()):
        assert torch.equal(b_o, b_t)


@pytest.mark.parametrize("target_bn", ["momentum", "batch"])
def test_one_step_applies_sgd_then_ema(target_bn):
    cfg = check(pretrain_cfg(settings={"target_bn": target_bn, "tau": 0.9}))
    m = _small_method(target_bn, tau=0.9)
    t = build_trainer(cfg, resolve(cfg.runtime, cfg.batch_size), m, total_steps=10)
    online_t, target_t = m.ema_pairs()
    target_before = [x.detach().clone() for x in target_t]
    params = [p for g in t.opt.param_groups for p in g["params"]]
    params_before = [p.detach().clone() for p in params]
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    train_step(t, (v1, v2), 0)
    # The optimizer's first step: p - lr (g + wd p) (momentum's buffer starts at that).
    lr, wd = t.lr_at(0), cfg.weight_decay
    stepped = 0
    for p, old in zip(params, params_before):
        if p.grad is not None:
            torch.testing.assert_close(p.detach(), old - lr * (p.grad + wd * old),
                                       rtol=1e-5, atol=1e-7)
            stepped += int(not torch.equal(p, old))
    assert stepped > len(params) // 2
    # The EMA used the *updated* online weights, and moved the target.
    for t_new, t_old, o in zip(target_t, target_before, online_t):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * o.detach(), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(target_t, target_before))
    assert t.ema.online.flat.data_ptr() == online_t[0].data_ptr()
    assert t.ema.target.flat.data_ptr() == target_t[0].data_ptr()


def test_momentum_bn_against_reference():
    """k-th call: the batch weighs max(1/k, 1 - momentum), so the first call normalises with
    the batch's own statistics whatever the buffers held (float64 recursion as the oracle)."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.num_batches_tracked.fill_(7)  # the online network's count is not the target's
    m = _small_method("momentum")
    mbn = [mod for mod in m.target.modules() if isinstance(mod, MomentumBatchNorm)][0]
    assert mbn.num_batches_tracked.item() == 0  # a fresh target starts its own count
    mbn = MomentumBatchNorm(3)
    mbn.load_state_dict(bn.state_dict())
    mbn.num_batches_tracked.zero_()
    mbn.stat_momentum = 0.9
    mbn = mbn.double()
    rm, rv = mbn.running_mean.clone(), mbn.running_var.clone()
    for k in range(1, 14):
        x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * (1 + k / 4) + 0.3 * k
        y = mbn(x)
        w = max(1 / k, 0.1)
        rm = (1 - w) * rm + w * x.mean((0, 2, 3))
        rv = (1 - w) * rv + w * x.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(mbn.running_mean, rm)
        torch.testing.assert_close(mbn.running_var, rv)
        want = (x - rm.view(1, 3, 1, 1)) / torch.sqrt(rv.view(1, 3, 1, 1) + mbn.eps) \
            * mbn.weight.view(1, 3, 1, 1) + mbn.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(y, want)
        if k == 1:  # normalised with the batch's own statistics
            torch.testing.assert_close(rm, x.mean((0, 2, 3)))


def test_target_uses_momentum_bn_and_online_plain_bn():
    m = _small_method("momentum")
    kinds = {type(mod) for mod in m.target.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {MomentumBatchNorm}
    assert not any(isinstance(mod, MomentumBatchNorm) for mod in _online(m).modules())
    sd = copy.deepcopy(m.state_dict())
    m.load_state_dict(sd)  # state dict keys survive the swap


def test_spread_reads_collapse():
    g = torch.Generator().manual_seed(2)
    healthy = torch.randn(4096, 128, generator=g)
    assert abs(spread(healthy).item() - 1) < 0.05  # isotropic: std of a unit coordinate ~ 1/sqrt(D)
    collapsed = torch.randn(1, 128, generator=g).expand(256, 128) + 1e-6 * torch.randn(256, 128, generator=g)
    assert spread(collapsed).item() < 1e-3
