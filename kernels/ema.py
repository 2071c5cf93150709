# The target-network EMA, target <- tau * target + (1 - tau) * online, as one launch.
#
# The usual loop (solo-learn, byol-pytorch) runs two small kernels per parameter, ~320
# launches for resnet50 + heads, each too small to reach memory bandwidth; `_foreach_lerp_`
# batches them into multi-tensor launches but still walks a pointer list per chunk. Here
# both networks' parameters live in one flat buffer each (FlatParams), so the EMA is one
# vectorised launch over contiguous memory. It is memory-bound: read target + online, write
# target = 12 bytes per fp32 element, so its speed is judged against a plain copy.

import torch
from torch import Tensor

from ._triton import tl, triton

# 4096 elements over 8 warps = 16 fp32 per thread, i.e. four 16-byte vector loads per
# tensor in flight per thread: enough bytes in flight to cover DRAM latency, while a
# resnet50 still splits into ~6k programs so the last wave over 132 SMs is a small tail.
BLOCK = 4096
NUM_WARPS = 8
# Triton specialises integer arguments divisible by 16. A kernel length that is lets it
# prove the bounds mask constant across each 4-element vector, so loads stay 128-bit.
PAD = 16


class FlatParams:
    """Tensors re-pointed at views of one contiguous buffer `.flat`.

    `.flat` covers exactly the tensors; it is the head of `.padded`, whose zero tail rounds
    the length up to a multiple of PAD for the kernel (target and online tails stay zero).

    Each view keeps its tensor's memory layout: a channels_last conv weight stays
    channels_last (its elements sit in the buffer in NHWC order), so cuDNN and oneDNN get the
    layout they were given instead of reordering NCHW weights at every convolution. Two
    FlatParams updated elementwise together (online and target) must then share layouts
    tensor by tensor (`same_layout`).

    Built once, from parameters or float buffers of one dtype and device. Afterwards every
    in-place update (optimizer steps, `load_state_dict`'s copy_, torch.compile) writes
    through the views into `.flat`. Anything that re-allocates a tensor (`module.to(...)`,
    `.cuda()`, `.half()`, `load_state_dict(assign=True)`) silently detaches it; `check()`
    detects that. Flatten after moving the model to its device and dtype.
    """

    def __init__(self, tensors):
        self.tensors = list(tensors)
        _validate(self.tensors)
        self.offsets, total = [], 0
        for t in self.tensors:
            self.offsets.append(total)
            total += t.numel()
        first = self.tensors[0]
        padded = -(-total // PAD) * PAD
        self.padded = torch.zeros(padded, dtype=first.dtype, device=first.device)
        self.flat = self.padded[:total]
        self.strides = [_dense_strides(t) for t in self.tensors]
        with torch.no_grad():
            for t, o, st in zip(self.tensors, self.offsets, self.strides):
                view = self.padded.as_strided(t.shape, st, o)  # padded starts its storage
                view.copy_(t)
                t.data = view  # the one place .data is rebound

    def is_valid(self) -> bool:
        base, size = self.flat.data_ptr(), self.flat.element_size()
        return all(t.data_ptr() == base + o * size and t.dtype == self.flat.dtype
                   and t.stride() == st
                   for t, o, st in zip(self.tensors, self.offsets, self.strides))

    def same_layout(self, other: "FlatParams") -> bool:
        """Whether element i of both buffers belongs to the same tensor element (EMA pairs)."""
        return [t.shape for t in self.tensors] == [t.shape for t in other.tensors] and \
            self.strides == other.strides

    def check(self) -> None:
        if not self.is_valid():
            raise RuntimeError(
                "FlatParams: some tensors no longer live in the flat buffer; they were "
                "re-allocated after flattening (module.to()/.cuda()/.half() or "
                "load_state_dict(assign=True)?). Move the model first, then build FlatParams.")


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """t's own strides when it is contiguous or (4-d) channels_last, the two layouts that
    cover exactly numel() elements here; otherwise the contiguous strides of its shape."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def _validate(tensors: list[Tensor]) -> None:
    if not tensors:
        raise ValueError("FlatParams needs at least one tensor")
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"FlatParams takes floating tensors only, got {t.dtype} "
                            "(integer buffers such as BatchNorm's num_batches_tracked are not "
                            "averaged)")
    first = tensors[0]
    if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        raise ValueError("FlatParams tensors must share one dtype and device")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError("FlatParams got the same tensor twice (tied weights?)")


def _check_pair(target: FlatParams, online: FlatParams) -> None:
    # O(1) on purpose: called every step. The per-tensor walk is FlatParams.check().
    t, o = target.flat, online.flat
    if t.shape != o.shape or t.dtype != o.dtype or t.device != o.device:
        raise ValueError(f"EMA pair mismatch: target {t.dtype} {tuple(t.shape)} on {t.device}, "
                         f"online {o.dtype} {tuple(o.shape)} on {o.device}")


@torch.no_grad()
def ema_reference_(target: FlatParams, online: FlatParams, tau: float | Tensor) -> None:
    """target <- tau * target + (1 - tau) * online, with torch's multi-tensor lerp.

    A 0-dim tensor `tau` (what a CUDA graph replays: its value is read on the device at each
    replay, never baked in) lerps the flat buffers in one op. 1 - tau is taken in float64:
    near the end of BYOL's schedule (tau within 1e-7 of 1) float32 would misstate it by 17%."""
    _check_pair(target, online)
    if isinstance(tau, Tensor):
        target.padded.lerp_(online.padded, (1.0 - tau.double()).to(target.padded.dtype))
    else:
        torch._foreach_lerp_(target.tensors, online.tensors, 1.0 - tau)


@torch.no_grad()
def ema_loop_(target: FlatParams, online: FlatParams, tau: float) -> None:
    """The per-parameter loop of solo-learn / byol-pytorch (benchmark baseline)."""
    _check_pair(target, online)
    for t, o in zip(target.tensors, online.tensors):
        t.data.mul_(tau).add_(o.data, alpha=1.0 - tau)


@triton.jit
def _ema_kernel(target_ptr, online_ptr, n, w_or_tau, TAU_IN_MEMORY: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if TAU_IN_MEMORY:  # a pointer to tau on the device: a CUDA graph replays with its new value
        w = (1.0 - tl.load(w_or_tau).to(tl.float64)).to(tl.float32)  # 1 - tau exact, as below
    else:  # w = 1 - tau, computed on the host in float64
        w = w_or_tau
    t = tl.load(target_ptr + offs, mask=mask)
    o = tl.load(online_ptr + offs, mask=mask)
    t32 = t.to(tl.float32)
    new = t32 + w * (o.to(tl.float32) - t32)  # lerp, as torch computes it for w < 0.5
    tl.store(target_ptr + offs, new.to(t.dtype), mask=mask)


def ema_triton_(target: FlatParams, online: FlatParams, tau: float | Tensor) -> None:
    """One in-place launch over the flat buffers; tau is a runtime float (no recompiles) or
    a 0-dim device tensor read by the kernel (CUDA graphs)."""
    _check_pair(target, online)
    if target.flat.dtype == torch.float64:  # it would round them to float32 (ema_ dispatches)
        raise ValueError("ema_triton_ computes in float32; use ema_reference_ for float64")
    n = target.padded.numel()
    in_memory = isinstance(tau, Tensor)
    if in_memory and (tau.numel() != 1 or tau.device != target.flat.device):
        raise ValueError(f"tau must be one value on {target.flat.device}, got "
                         f"{tuple(tau.shape)} on {tau.device}")
    _ema_kernel[(triton.cdiv(n, BLOCK),)](target.padded, online.padded, n,
                                          tau if in_memory else 1.0 - float(tau), in_memory,
                                          BLOCK=BLOCK, num_warps=NUM_WARPS)
