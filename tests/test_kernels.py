"""sstl.kernels: the fused Cross loss and the flat EMA.

Oracles: autograd of a float64 F.normalize reference for the loss (fresh inputs per case),
gradcheck, torch.library.opcheck, the EMA formula on a real resnet18 after a real optimizer
step, and a torch.compile'd training step against eager. Without a GPU the Triton kernels
run on CPU tensors through the interpreter (TRITON_INTERPRET=1 is set in conftest.py,
before triton is imported); on a GPU run them compiled with TRITON_INTERPRET=0.
"""
import copy
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torchvision

import sstl.kernels as K
from sstl.kernels.loss import CrossLoss, cross_loss_op

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not K.triton_available(DEVICE),
                                  reason="triton missing (or CPU without TRITON_INTERPRET=1)")

# B=1; odd D; D=128 (the method's); D > BLOCK_D (256) and not a multiple of it.
SHAPES = [(1, 1), (1, 128), (7, 33), (16, 130), (64, 128), (4, 1000), (3, 4096)]


def _views(B, D, dtype=torch.float32, tag=""):
    """Fresh, case-specific inputs shaped like the method's: three correlated embeddings."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{B},{D},{dtype},{tag}".encode()))
    p2 = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
    p1 = p2 + torch.randn(B, D, generator=g, dtype=torch.float64)
    y2 = p2 + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (p1, p2, y2)]


def _grads(loss_fn, p1, p2, y2):
    p1, p2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    loss = loss_fn(p1, p2, y2)
    return (loss, *torch.autograd.grad(loss, (p1, p2)))


def _fp64_reference(p1, p2, y2):
    return _grads(K.cross_loss_reference, p1.double(), p2.double(), y2.double())


def _rel(x, ref, B):
    # Gradient terms are O(1/B) per element; at D=1 they cancel to 0, so never divide by less.
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1 / B)).item()


def _triton(p1, p2, y2):
    return _grads(lambda a, b, y: CrossLoss.apply(a, b, y, True), p1, p2, y2)


# ----------------------------------------------------------------------------- loss
@needs_triton
@pytest.mark.parametrize("B,D", SHAPES)
def test_loss_fp32_matches_fp64_reference(B, D):
    p1, p2, y2 = _views(B, D)
    got, ref = _triton(p1, p2, y2), _fp64_reference(p1, p2, y2)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert got[1].dtype == got[2].dtype == torch.float32
    for x, r in zip(got, ref):
        assert _rel(x, r, B) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,D", [(1, 128), (16, 130), (64, 128)])
def test_loss_low_precision(B, D, dtype):
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("Triton's CPU interpreter has no bfloat16 (numpy lacks the type)")
    p1, p2, y2 = _views(B, D, dtype)
    got, ref = _triton(p1, p2, y2), _fp64_reference(p1, p2, y2)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert _rel(got[0], ref[0], B) < 1e-5  # fp32 accumulation of exactly-representable inputs
    grad_tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # ~2 roundings of the output dtype
    assert _rel(got[1], ref[1], B) < grad_tol and _rel(got[2], ref[2], B) < grad_tol


def _zero_and_tiny_rows():
    p1, p2, y2 = _views(6, 40, tag="zeros")
    p1[0], p2[1], y2[2] = 0, 0, 0  # one zero row in each input
    p1[3], p2[3], y2[3] = 0, 0, 0  # all three zero: loss 4, gradient 0
    p1[4] *= 1e-10  # |p1| < eps: the clamp makes the norm constant
    p2[5] *= 1e-10
    return p1, p2, y2


@needs_triton
def test_zero_and_tiny_rows_match_reference():
    p1, p2, y2 = _zero_and_tiny_rows()
    got, ref = _triton(p1, p2, y2), _fp64_reference(p1, p2, y2)
    assert all(torch.isfinite(x).all() for x in got)
    assert got[1][3].abs().max() == 0 and got[2][3].abs().max() == 0
    for x, r in zip(got, ref):
        assert _rel(x, r, 6) < 1e-5
    assert CrossLoss.apply(p1[3:4], p2[3:4], y2[3:4], True).item() == 4.0  # 2 per term


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)])
def test_target_gets_no_gradient(fused):
    p1, p2, y2 = _views(4, 16)
    p1.requires_grad_(), p2.requires_grad_(), y2.requires_grad_()
    for loss in (CrossLoss.apply(p1, p2, y2, fused), cross_loss_op(p1, p2, y2, fused)[0],
                 K.cross_loss_reference(p1, p2, y2)):
        loss.backward()
    assert y2.grad is None and p1.grad is not None and p2.grad is not None


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)])
def test_gradcheck_float64(fused):
    """The fp64 Triton kernels accumulate in fp64, so gradcheck checks them directly too."""
    p1, p2, y2 = _views(3, 5, torch.float64)
    p1.requires_grad_(), p2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: CrossLoss.apply(a, b, y2, fused), (p1, p2))
    assert torch.autograd.gradcheck(lambda a, b: cross_loss_op(a, b, y2, fused)[0], (p1, p2))


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)])
def test_custom_op_registration(fused):
    """Schema, fake (meta) impl, autograd registration and AOT tracing, checked by torch;
    also for transposed inputs and mixed layouts, where the backward's fake once promised
    p1's strides while the kernels returned contiguous gradients (compile then failed)."""
    from sstl.kernels import cosine, loss

    p1, p2, y2 = _views(5, 24)
    torch.library.opcheck(cross_loss_op, (p1.requires_grad_(), p2.requires_grad_(), y2, fused))
    t1, t2, ty = (x.detach().T.contiguous().T for x in _views(5, 24))  # (5, 24), transposed
    one = torch.tensor(1.0, device=DEVICE)
    for a, b, y in ((t1, t2, ty), (t1, p2.detach(), y2), (p1.detach(), t2, ty)):
        torch.library.opcheck(cross_loss_op, (a.clone().requires_grad_(),
                                              b.clone().requires_grad_(), y, fused))
        torch.library.opcheck(cosine.cosine_loss_op, (a.clone().requires_grad_(), y, fused))
        torch.library.opcheck(loss.cross_loss_backward_op,
                              (one, a, b, y, loss._forward(a, b, y, fused), fused))
        torch.library.opcheck(cosine.cosine_loss_backward_op,
                              (one, a, y, cosine._forward(a, y, fused), fused))


@needs_triton
def test_torch_path_and_custom_op_match_triton():
    p1, p2, y2 = _views(33, 130)
    fused = _triton(p1, p2, y2)
    for front in (lambda a, b, y: CrossLoss.apply(a, b, y, False),
                  lambda a, b, y: cross_loss_op(a, b, y, True)[0]):
        for x, r in zip(_grads(front, p1, p2, y2), fused):
            torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-7)


def test_dispatch_and_env_override(monkeypatch):
    p1, p2, y2 = _views(8, 32)
    monkeypatch.setenv("SSTL_KERNELS", "auto")
    assert K.use_triton(DEVICE) == (DEVICE.type == "cuda" and K.triton_available(DEVICE))
    for x, r in zip(_grads(K.cross_loss, p1, p2, y2), _fp64_reference(p1, p2, y2)):
        assert _rel(x, r, 8) < 1e-5
    monkeypatch.setenv("SSTL_KERNELS", "reference")
    assert not K.use_triton(DEVICE)
    monkeypatch.setenv("SSTL_KERNELS", "triton")
    if K.triton_available(DEVICE):
        assert K.use_triton(DEVICE)
    # Asked for Triton on a CPU without the interpreter: refused, never a silent fallback.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.triton_available("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.use_triton("cpu")
    monkeypatch.setenv("SSTL_KERNELS", "fast")
    with pytest.raises(ValueError, match="SSTL_KERNELS"):
        K.use_triton(DEVICE)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, sstl.kernels as K\n"
            "assert not K.triton_available('cuda') and not K.use_triton('cpu')\n"
            "x = torch.randn(4, 8, requires_grad=True)\n"
            "K.cross_loss(x, x + 1, x.detach()).backward()\n")
    env = {k: v for k, v in os.environ.items() if k != "SSTL_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------ EMA
@pytest.fixture
def resnet_pair():
    """online/target resnet18s, flattened BEFORE the optimizer exists (as training does)."""
    torch.manual_seed(0)
    online = torchvision.models.resnet18().to(DEVICE)
    target = copy.deepcopy(online)
    flat_o, flat_t = K.FlatParams(online.parameters()), K.FlatParams(target.parameters())
    return online, target, flat_o, flat_t


def _sgd_step(online):
    opt = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
    online(torch.randn(2, 3, 32, 32, device=DEVICE)).square().mean().backward()
    opt.step()


def test_flat_views_follow_optimizer_step(resnet_pair):
    online, _, flat_o, _ = resnet_pair
    before, ptr = flat_o.flat.clone(), flat_o.flat.data_ptr()
    _sgd_step(online)
    flat_o.check()
    grads = torch.cat([p.grad.flatten() for p in online.parameters()])
    # First SGD step with momentum: the buffer is the gradient, so p <- p - lr * g.
    torch.testing.assert_close(flat_o.flat, before - 0.1 * grads)
    assert flat_o.flat.data_ptr() == ptr and not torch.equal(flat_o.flat, before)


def test_ema_triton_reference_loop_agree(resnet_pair):
    online, target, flat_o, flat_t = resnet_pair
    _sgd_step(online)  # so that online != target
    tau, start = 0.996, flat_t.flat.clone()
    expected = (tau * start.double() + (1 - tau) * flat_o.flat.double()).float()
    ptrs = [t.data_ptr() for t in flat_t.tensors]
    methods = [K.ema_reference_, K.ema_loop_, K.ema_]
    methods += [K.ema_triton_] if K.triton_available(DEVICE) else []
    for ema in methods:
        flat_t.flat.copy_(start)
        ema(flat_t, flat_o, tau)
        torch.testing.assert_close(flat_t.flat, expected, rtol=1e-6, atol=1e-7)
        assert [t.data_ptr() for t in flat_t.tensors] == ptrs  # in place
        assert not flat_t.padded[flat_t.flat.numel():].any()  # the kernel's pad stays zero
    torch.testing.assert_close(target.conv1.weight, expected[:target.conv1.weight.numel()]
                               .view_as(target.conv1.weight))  # the module sees the update


def test_ema_with_tau_on_the_device_matches_the_float64_formula(resnet_pair):
    """The form a CUDA graph replays: tau is read from a 0-dim device tensor at each launch,
    so writing a new value into it (fill_) changes the next update without a new launch."""
    online, _, flat_o, flat_t = resnet_pair
    _sgd_step(online)
    start = flat_t.flat.clone()
    methods = [K.ema_reference_, K.ema_] + ([K.ema_triton_] if K.triton_available(DEVICE) else [])
    for ema in methods:
        flat_t.flat.copy_(start)
        tau = torch.tensor(0.5, device=flat_t.flat.device)
        ema(flat_t, flat_o, tau)
        tau.fill_(0.99)  # the second update must see the new value
        ema(flat_t, flat_o, tau)
        x, o = start.double(), flat_o.flat.double()
        t32 = torch.tensor([0.5, 0.99]).double()  # tau as the device holds it (float32)
        once = t32[0] * x + (1 - t32[0]) * o
        expected = (t32[1] * once + (1 - t32[1]) * o).float()
        torch.testing.assert_close(flat_t.flat, expected, rtol=1e-6, atol=1e-7)
        assert not flat_t.padded[flat_t.flat.numel():].any()


@pytest.mark.parametrize("tau", [1 - 5.1e-8, 1 - 3e-6, 0.996])
def test_ema_step_size_near_tau_one_is_exact(tau):
    """At the end of BYOL's cosine schedule tau is within 1e-7 of 1: the step 1 - tau must be
    the host's float64 value, not 1 - float32(tau) (off by 17% there). A target of zeros and
    an online of ones makes the update equal to the step itself."""
    target, online = torch.zeros(2, 3, device=DEVICE), torch.ones(2, 3, device=DEVICE)
    flat_t, flat_o = K.FlatParams([target]), K.FlatParams([online])
    methods = [K.ema_reference_, K.ema_] + ([K.ema_triton_] if K.triton_available(DEVICE) else [])
    for ema in methods:
        for t in (tau, torch.tensor(tau, dtype=torch.float64, device=DEVICE)):
            flat_t.flat.zero_()
            ema(flat_t, flat_o, t)
            torch.testing.assert_close(flat_t.flat, torch.full_like(flat_t.flat, 1 - tau),
                                       rtol=1e-6, atol=0)


def test_flat_views_survive_load_state_dict(resnet_pair):
    online, _, flat_o, _ = resnet_pair
    ptr = flat_o.flat.data_ptr()
    fresh = torchvision.models.resnet18().state_dict()
    online.load_state_dict(fresh)
    flat_o.check()
    loaded = torch.cat([fresh[name].flatten() for name, _ in online.named_parameters()])
    assert flat_o.flat.data_ptr() == ptr and torch.equal(flat_o.flat.cpu(), loaded)


def test_channels_last_weights_keep_their_layout_and_the_ema_stays_exact():
    """Flattening used to re-point every weight at an NCHW view, silently undoing
    channels_last (the engine converts before flattening), so every convolution met NHWC
    activations with NCHW weights. Oracle: layouts kept, values kept, and the one-launch
    EMA equals the float64 formula tensor by tensor."""
    from sstl.engine.loop import EMA

    torch.manual_seed(0)
    online = torchvision.models.resnet18().to(DEVICE).to(memory_format=torch.channels_last)
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    was = {n: (p.stride(), p.detach().clone()) for n, p in online.named_parameters()}
    ema = EMA(list(online.parameters()), list(target.parameters()))
    assert online.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert target.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for n, p in online.named_parameters():
        assert p.stride() == was[n][0] and torch.equal(p, was[n][1]), n
    start = {n: p.detach().double().clone() for n, p in target.named_parameters()}
    ema.update(0.9)
    ema.check()
    for (n, t), o in zip(target.named_parameters(), online.parameters()):
        want = (0.9 * start[n] + 0.1 * o.double()).float()
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7, msg=n)
    other = copy.deepcopy(online).to(memory_format=torch.contiguous_format)
    with pytest.raises(ValueError, match="memory layout"):
        EMA(list(other.parameters()), list(copy.deepcopy(target).parameters()))


def test_flat_params_rejects_and_detects():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="num_batches_tracked"):
        K.FlatParams(net.buffers())
    K.FlatParams(b for b in net.buffers() if b.is_floating_point())  # running stats are fine
    with pytest.raises(ValueError, match="twice"):
        K.FlatParams([net[0].weight, net[0].weight])
    flat = K.FlatParams(net.parameters())
    with pytest.raises(ValueError, match="mismatch"):
        K.ema_(flat, K.FlatParams([torch.zeros(3)]), 0.9)
    net.double()  # re-allocates every parameter behind FlatParams' back
    assert not flat.is_valid()
    with pytest.raises(RuntimeError, match="re-allocated"):
        flat.check()


# ------------------------------------------------------------------------ compile
def test_compiled_training_step_matches_eager(monkeypatch):
    """MLP -> cross_loss (Triton where it can run) -> backward -> SGD: compiled vs eager.

    fullgraph=True turns any graph break into an error. backward() cannot sit inside a
    compiled region without compiled autograd, so the compiled function is the forward
    (both networks + loss); its backward runs as the AOT-compiled backward graph; SGD is eager.
    """
    monkeypatch.setenv("SSTL_KERNELS", "triton" if K.triton_available(DEVICE) else "auto")
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                 torch.nn.Linear(32, 8)).to(DEVICE)
    target = copy.deepcopy(online).requires_grad_(False)
    twins = [online, copy.deepcopy(online)]

    def forward(net, loss_fn, x1, x2):
        with torch.no_grad():
            y2 = target(x2)
        return loss_fn(net(x1), net(x2), y2)

    compiled = torch.compile(forward, fullgraph=True)
    opts = [torch.optim.SGD(net.parameters(), lr=0.5) for net in twins]
    for _ in range(2):  # the second step reuses the graph with updated parameters
        x1, x2 = torch.randn(2, 8, 16, device=DEVICE)
        losses = [compiled(twins[0], K.cross_loss, x1, x2),
                  forward(twins[1], K.cross_loss_reference, x1, x2)]
        for loss, opt in zip(losses, opts):
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*(net.parameters() for net in twins)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
