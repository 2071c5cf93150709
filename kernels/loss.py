# The Cross loss (Li et al.) as two fused Triton kernels.
#
#   L = mean_b [ (2 - 2 cos(P1_b, P2_b)) + (2 - 2 cos(P2_b, Y2_b)) ],  cos via x / max(|x|, eps)
#
# P1, P2 are the online predictions of the two views (both get gradients), Y2 the target
# projection of view 2 (no gradient). In eager PyTorch this is ~10 small ops (3 norms, 3
# clamps/divisions, 2 products, 2 row sums, the mean) forward and about as many backward:
# each op is a launch and a pass over (B, D) bytes, and at B=256, D=128 the whole problem is
# ~400 KB, so the step is pure launch latency. Here the forward is one launch that reads
# P1, P2, Y2 once and writes per-row loss + the five row sums backward needs; the backward
# is one launch that reads P1, P2, Y2 once and writes dP1, dP2 once.
#
# The batch mean is a torch .mean() over the per-row losses rather than an atomic add in
# the kernel: deterministic (same bits every run) for one extra launch over B floats.
# Without Triton (or for SSTL_KERNELS=reference) the same closed-form math runs in torch.
#
# Derivation (what autograd of F.normalize gives). With r = |a|, s = max(r, eps) and
# c = <a, b> / (s_a s_b):   dc/da = b / (s_a s_b) - [r_a >= eps] * c * a / s_a^2.
# Below eps the clamp makes the norm a constant, so only the first term survives; a zero
# row therefore has a finite loss (2 per term) and a finite but large gradient, b / (eps s_b),
# as autograd of F.normalize gives it.

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import EPS, acc_dtype, blocks
from ._triton import tl, triton


def cross_loss_reference(p1: Tensor, p2: Tensor, y2: Tensor, eps: float = EPS) -> Tensor:
    """The loss in plain torch ops (differentiable; Y2 is detached). fp16/bf16 compute in fp32."""
    dt = acc_dtype(p1.dtype)
    n1, n2, ny = (F.normalize(t.to(dt), dim=-1, eps=eps) for t in (p1, p2, y2.detach()))
    return ((2 - 2 * (n1 * n2).sum(-1)) + (2 - 2 * (n2 * ny).sum(-1))).mean()


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _cross_fwd_kernel(p1_ptr, p2_ptr, y2_ptr, stats_ptr, B, D, eps,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # stats rows: 0 loss, 1 <p1,p2>, 2 <p2,y2>, 3 |p1|^2, 4 |p2|^2, 5 |y2|^2 (each of length B)
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * D
    # Elementwise accumulators, reduced once after the loop (fewer reductions, better sums).
    d12 = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    d2y = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    q1 = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    q2 = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    qy = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        a = tl.load(p1_ptr + base + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        b = tl.load(p2_ptr + base + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        y = tl.load(y2_ptr + base + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        d12 += a * b
        d2y += b * y
        q1 += a * a
        q2 += b * b
        qy += y * y
    d12s, d2ys = tl.sum(d12, axis=1), tl.sum(d2y, axis=1)
    q1s, q2s, qys = tl.sum(q1, axis=1), tl.sum(q2, axis=1), tl.sum(qy, axis=1)
    s1 = tl.maximum(tl.sqrt(q1s), eps)
    s2 = tl.maximum(tl.sqrt(q2s), eps)
    sy = tl.maximum(tl.sqrt(qys), eps)
    loss = 4.0 - 2.0 * d12s / (s1 * s2) - 2.0 * d2ys / (s2 * sy)
    tl.store(stats_ptr + rows, loss, mask=rmask)
    tl.store(stats_ptr + B + rows, d12s, mask=rmask)
    tl.store(stats_ptr + 2 * B + rows, d2ys, mask=rmask)
    tl.store(stats_ptr + 3 * B + rows, q1s, mask=rmask)
    tl.store(stats_ptr + 4 * B + rows, q2s, mask=rmask)
    tl.store(stats_ptr + 5 * B + rows, qys, mask=rmask)


@triton.jit
def _cross_bwd_kernel(p1_ptr, p2_ptr, y2_ptr, stats_ptr, grad_ptr, dp1_ptr, dp2_ptr, B, D, eps,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * D
    d12 = tl.load(stats_ptr + B + rows, mask=rmask, other=0.0)
    d2y = tl.load(stats_ptr + 2 * B + rows, mask=rmask, other=0.0)
    r1 = tl.sqrt(tl.load(stats_ptr + 3 * B + rows, mask=rmask, other=0.0))
    r2 = tl.sqrt(tl.load(stats_ptr + 4 * B + rows, mask=rmask, other=0.0))
    ry = tl.sqrt(tl.load(stats_ptr + 5 * B + rows, mask=rmask, other=0.0))
    s1, s2, sy = tl.maximum(r1, eps), tl.maximum(r2, eps), tl.maximum(ry, eps)
    c12 = d12 / (s1 * s2)
    c2y = d2y / (s2 * sy)
    # The grad_out scalar is read on the device: no .item() sync, and it traces under compile.
    k = -2.0 * tl.load(grad_ptr).to(acc_ty) / B
    # dP1 = k (P2 a12 + P1 b1),  dP2 = k (P1 a12 + Y2 a2y + P2 b2)   (see header)
    a12 = (k / (s1 * s2))[:, None]
    a2y = (k / (s2 * sy))[:, None]
    b1 = (-k * tl.where(r1 >= eps, c12, 0.0) / (s1 * s1))[:, None]
    b2 = (-k * tl.where(r2 >= eps, c12 + c2y, 0.0) / (s2 * s2))[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = base + cols[None, :]
        a = tl.load(p1_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        b = tl.load(p2_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        y = tl.load(y2_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(dp1_ptr + offs, (b * a12 + a * b1).to(dp1_ptr.dtype.element_ty), mask=mask)
        tl.store(dp2_ptr + offs, (a * a12 + y * a2y + b * b2).to(dp2_ptr.dtype.element_ty),
                 mask=mask)


def _forward_triton(p1: Tensor, p2: Tensor, y2: Tensor) -> Tensor:
    B, D = p1.shape
    stats = torch.empty((6, B), dtype=acc_dtype(p1.dtype), device=p1.device)
    block_b, block_d = blocks(B, D)
    _cross_fwd_kernel[(triton.cdiv(B, block_b),)](
        p1, p2, y2, stats, B, D, EPS, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
    return stats


def _backward_triton(grad, p1, p2, y2, stats) -> tuple[Tensor, Tensor]:
    B, D = p1.shape
    dp1, dp2 = torch.empty_like(p1), torch.empty_like(p2)
    block_b, block_d = blocks(B, D)
    _cross_bwd_kernel[(triton.cdiv(B, block_b),)](
        p1, p2, y2, stats, grad, dp1, dp2, B, D, EPS,
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
    return dp1, dp2


# ------------------------------------------------------ the same math in torch (fallback)
def _forward_torch(p1: Tensor, p2: Tensor, y2: Tensor) -> Tensor:
    a, b, y = (t.to(acc_dtype(p1.dtype)) for t in (p1, p2, y2))
    d12, d2y = (a * b).sum(-1), (b * y).sum(-1)
    q1, q2, qy = (a * a).sum(-1), (b * b).sum(-1), (y * y).sum(-1)
    s1, s2, sy = (q.sqrt().clamp_min(EPS) for q in (q1, q2, qy))
    loss = 4 - 2 * d12 / (s1 * s2) - 2 * d2y / (s2 * sy)
    return torch.stack([loss, d12, d2y, q1, q2, qy])


def _backward_torch(grad, p1, p2, y2, stats) -> tuple[Tensor, Tensor]:
    a, b, y = (t.to(stats.dtype) for t in (p1, p2, y2))
    _, d12, d2y, q1, q2, qy = stats.unsqueeze(-1).unbind(0)
    r1, r2, ry = q1.sqrt(), q2.sqrt(), qy.sqrt()
    s1, s2, sy = r1.clamp_min(EPS), r2.clamp_min(EPS), ry.clamp_min(EPS)
    c12, c2y = d12 / (s1 * s2), d2y / (s2 * sy)
    k = -2 * grad.to(stats.dtype) / p1.shape[0]
    b1 = -k * torch.where(r1 >= EPS, c12, 0) / (s1 * s1)
    b2 = -k * torch.where(r2 >= EPS, c12 + c2y, 0) / (s2 * s2)
    dp1 = b * k / (s1 * s2) + a * b1
    dp2 = a * k / (s1 * s2) + y * k / (s2 * sy) + b * b2
    return dp1.to(p1.dtype), dp2.to(p2.dtype)


def _forward(p1: Tensor, p2: Tensor, y2: Tensor, use_triton: bool) -> Tensor:
    if p1.ndim != 2 or p1.shape != p2.shape or p1.shape != y2.shape:
        raise ValueError(f"cross_loss wants three (B, D) tensors, got {tuple(p1.shape)}, "
                         f"{tuple(p2.shape)}, {tuple(y2.shape)}")
    if use_triton:
        return _forward_triton(p1.contiguous(), p2.contiguous(), y2.contiguous())
    return _forward_torch(p1, p2, y2)


def _backward(grad, p1, p2, y2, stats, use_triton: bool) -> tuple[Tensor, Tensor]:
    """(dP1, dP2), always contiguous: the custom op's fake promises that layout to compile."""
    if use_triton:
        return _backward_triton(*(t.contiguous() for t in (grad, p1, p2, y2, stats)))
    return tuple(g.contiguous() for g in _backward_torch(grad, p1, p2, y2, stats))


# ------------------------------------------------------- two autograd front ends, one math
# Eager: a plain autograd.Function. Measured on a 2-core CPU box it costs ~110 us less per
# fwd+bwd than the custom op's Python dispatch, which matters next to ~10 us of kernels.
class CrossLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p1: Tensor, p2: Tensor, y2: Tensor, use_triton: bool) -> Tensor:
        stats = _forward(p1, p2, y2, use_triton)
        ctx.save_for_backward(p1, p2, y2, stats)
        ctx.use_triton = use_triton
        return stats[0].mean()

    @staticmethod
    def backward(ctx, grad):
        p1, p2, y2, stats = ctx.saved_tensors
        return *_backward(grad, p1, p2, y2, stats, ctx.use_triton), None, None  # Y2: no grad


# torch.compile: a custom op, which dynamo traces around without a graph break (the fake
# impl gives shapes, register_autograd the backward). It returns (loss, stats): stats is
# the (6, B) buffer the backward needs and is not differentiable.
@torch.library.custom_op("sstl::cross_loss", mutates_args=())
def cross_loss_op(p1: Tensor, p2: Tensor, y2: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    stats = _forward(p1, p2, y2, use_triton)
    return stats[0].mean(), stats


@cross_loss_op.register_fake
def _(p1, p2, y2, use_triton):
    dt = acc_dtype(p1.dtype)
    return p1.new_empty((), dtype=dt), p1.new_empty((6, p1.shape[0]), dtype=dt)


@torch.library.custom_op("sstl::cross_loss_backward", mutates_args=())
def cross_loss_backward_op(grad: Tensor, p1: Tensor, p2: Tensor, y2: Tensor, stats: Tensor,
                           use_triton: bool) -> tuple[Tensor, Tensor]:
    return _backward(grad, p1, p2, y2, stats, use_triton)


@cross_loss_backward_op.register_fake
def _(grad, p1, p2, y2, stats, use_triton):  # contiguous, as _backward returns them
    return p1.new_empty(p1.shape), p2.new_empty(p2.shape)


def _setup_context(ctx, inputs, output):
    p1, p2, y2, ctx.use_triton = inputs
    ctx.save_for_backward(p1, p2, y2, output[1])


def _op_backward(ctx, grad_loss, _grad_stats):
    p1, p2, y2, stats = ctx.saved_tensors
    dp1, dp2 = cross_loss_backward_op(grad_loss, p1, p2, y2, stats, ctx.use_triton)
    return dp1, dp2, None, None


cross_loss_op.register_autograd(_op_backward, setup_context=_setup_context)
