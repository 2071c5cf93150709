# The normalized-cosine regression loss of BYOL and SimSiam as two fused Triton kernels.
#
#   L = mean_b [ 2 - 2 cos(A_b, B_b) ],  cos via x / max(|x|, eps),  gradient to A only
#
# A holds online predictions, B the regressed targets (an EMA network's projections, or the
# stop-gradient branch): B never gets a gradient. As in loss.py (the Cross loss), eager
# PyTorch spends ~8 launches and passes over (B, D) forward and as many backward; here the
# forward is one launch writing per-row loss and the three row sums backward needs, the
# backward one launch writing dA. Batch mean by torch (deterministic, no atomics).
#
# Gradient (autograd of F.normalize): with r = |a|, s = max(r, eps), c = <a, b> / (s_a s_b),
#   dL_b/da = -2 (b / (s_a s_b) - [r_a >= eps] c a / s_a^2)

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import tl, triton
from ._rows import EPS, acc_dtype, blocks


def cosine_loss_reference(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """The loss in plain torch ops (differentiable in `a`; `b` is detached)."""
    dt = acc_dtype(a.dtype)
    na, nb = F.normalize(a.to(dt), dim=-1, eps=eps), F.normalize(b.detach().to(dt), dim=-1, eps=eps)
    return (2 - 2 * (na * nb).sum(-1)).mean()


@triton.jit
def _cos_fwd_kernel(a_ptr, b_ptr, stats_ptr, B, D, eps, BLOCK_B: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # stats rows: 0 loss, 1 <a,b>, 2 |a|^2, 3 |b|^2 (each of length B)
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * D
    dab = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    qa = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    qb = tl.zeros([BLOCK_B, BLOCK_D], acc_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + base + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        b = tl.load(b_ptr + base + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        dab += a * b
        qa += a * a
        qb += b * b
    dabs, qas, qbs = tl.sum(dab, axis=1), tl.sum(qa, axis=1), tl.sum(qb, axis=1)
    sa = tl.maximum(tl.sqrt(qas), eps)
    sb = tl.maximum(tl.sqrt(qbs), eps)
    tl.store(stats_ptr + rows, 2.0 - 2.0 * dabs / (sa * sb), mask=rmask)
    tl.store(stats_ptr + B + rows, dabs, mask=rmask)
    tl.store(stats_ptr + 2 * B + rows, qas, mask=rmask)
    tl.store(stats_ptr + 3 * B + rows, qbs, mask=rmask)


@triton.jit
def _cos_bwd_kernel(a_ptr, b_ptr, stats_ptr, grad_ptr, da_ptr, B, D, eps,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * D
    dab = tl.load(stats_ptr + B + rows, mask=rmask, other=0.0)
    ra = tl.sqrt(tl.load(stats_ptr + 2 * B + rows, mask=rmask, other=0.0))
    rb = tl.sqrt(tl.load(stats_ptr + 3 * B + rows, mask=rmask, other=0.0))
    sa, sb = tl.maximum(ra, eps), tl.maximum(rb, eps)
    c = dab / (sa * sb)
    k = -2.0 * tl.load(grad_ptr).to(acc_ty) / B  # grad_out read on the device: no sync
    wb = (k / (sa * sb))[:, None]
    wa = (-k * tl.where(ra >= eps, c, 0.0) / (sa * sa))[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = base + cols[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(da_ptr + offs, (b * wb + a * wa).to(da_ptr.dtype.element_ty), mask=mask)


def _forward(a: Tensor, b: Tensor, use_triton: bool) -> Tensor:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"cosine_loss wants two (B, D) tensors, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    dt = acc_dtype(a.dtype)
    if use_triton:
        a, b = a.contiguous(), b.contiguous()
        B, D = a.shape
        stats = torch.empty((4, B), dtype=dt, device=a.device)
        bb, bd = blocks(B, D)
        _cos_fwd_kernel[(triton.cdiv(B, bb),)](a, b, stats, B, D, EPS, BLOCK_B=bb, BLOCK_D=bd,
                                               num_warps=4)
        return stats
    x, y = a.to(dt), b.to(dt)
    dab, qa, qb = (x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1)
    loss = 2 - 2 * dab / (qa.sqrt().clamp_min(EPS) * qb.sqrt().clamp_min(EPS))
    return torch.stack([loss, dab, qa, qb])


def _backward(grad: Tensor, a: Tensor, b: Tensor, stats: Tensor, use_triton: bool) -> Tensor:
    """dA, always contiguous: the custom op's fake promises that layout to compile."""
    if use_triton:
        a, b, stats, grad = a.contiguous(), b.contiguous(), stats.contiguous(), grad.contiguous()
        B, D = a.shape
        da = torch.empty_like(a)
        bb, bd = blocks(B, D)
        _cos_bwd_kernel[(triton.cdiv(B, bb),)](a, b, stats, grad, da, B, D, EPS, BLOCK_B=bb,
                                               BLOCK_D=bd, num_warps=4)
        return da
    x, y = a.to(stats.dtype), b.to(stats.dtype)
    _, dab, qa, qb = stats.unsqueeze(-1).unbind(0)
    ra, rb = qa.sqrt(), qb.sqrt()
    sa, sb = ra.clamp_min(EPS), rb.clamp_min(EPS)
    k = -2 * grad.to(stats.dtype) / a.shape[0]
    wa = -k * torch.where(ra >= EPS, dab / (sa * sb), 0) / (sa * sa)
    return (y * k / (sa * sb) + x * wa).to(a.dtype).contiguous()


class CosineLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, use_triton: bool) -> Tensor:
        stats = _forward(a, b, use_triton)
        ctx.save_for_backward(a, b, stats)
        ctx.use_triton = use_triton
        return stats[0].mean()

    @staticmethod
    def backward(ctx, grad):
        a, b, stats = ctx.saved_tensors
        return _backward(grad, a, b, stats, ctx.use_triton), None, None


# torch.compile traces a custom op (as loss.py does for the Cross loss).
@torch.library.custom_op("sstl::cosine_loss", mutates_args=())
def cosine_loss_op(a: Tensor, b: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    stats = _forward(a, b, use_triton)
    return stats[0].mean(), stats


@cosine_loss_op.register_fake
def _(a, b, use_triton):
    dt = acc_dtype(a.dtype)
    return a.new_empty((), dtype=dt), a.new_empty((4, a.shape[0]), dtype=dt)


@torch.library.custom_op("sstl::cosine_loss_backward", mutates_args=())
def cosine_loss_backward_op(grad: Tensor, a: Tensor, b: Tensor, stats: Tensor,
                            use_triton: bool) -> Tensor:
    return _backward(grad, a, b, stats, use_triton)


@cosine_loss_backward_op.register_fake
def _(grad, a, b, stats, use_triton):  # contiguous, as _backward returns it
    return a.new_empty(a.shape)


def _setup_context(ctx, inputs, output):
    a, b, ctx.use_triton = inputs
    ctx.save_for_backward(a, b, output[1])


def _op_backward(ctx, grad_loss, _grad_stats):
    a, b, stats = ctx.saved_tensors
    return cosine_loss_backward_op(grad_loss, a, b, stats, ctx.use_triton), None, None


cosine_loss_op.register_autograd(_op_backward, setup_context=_setup_context)
