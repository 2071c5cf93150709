"""Many processes (torchrun): the process group and the few collectives the engine uses.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; `group(res)` joins them (NCCL on CUDA, gloo on the CPU) and leaves at the
end. Everything here is a no-op in a single process, so the commands call it unconditionally.

Two kinds of waiting, two timeouts:
  * collectives of the training step (DDP's gradient all-reduce, SyncBatchNorm, the log-every
    read) use the default group with `timeout` (10 minutes): a peer that died or hangs becomes
    an error on the others, not a hang;
  * `barrier()`, where the other ranks wait for rank 0 to do something alone (decode the data
    cache, create the run directory, evaluate the test split), runs on a CPU (gloo) group with
    a longer timeout, because a first scan of a large folder can take longer than 10 minutes.
A rank that exits makes torchrun stop the others, so the long timeout only bounds a stuck rank 0.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from .io import first_line

TIMEOUT = timedelta(minutes=10)  # a training collective waits this long for a peer
WAIT = timedelta(hours=3)  # the others wait this long for rank 0's work alone (data cache...)
_wait_group = None


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def env() -> tuple[int, int, int]:
    """Rank, world size and local rank: the one place they come from (torchrun's variables)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def rank() -> int:
    return dist.get_rank() if initialized() else env()[0]


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def group(res, timeout: timedelta = TIMEOUT):
    """Join the other processes of this run (when there are any) for the body, then leave."""
    if res.world_size == 1 or initialized():
        yield
        return
    global _wait_group
    on_gpu = res.device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(res.device)
    try:
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
        _wait_group = dist.new_group(backend="gloo", timeout=max(timeout, WAIT))
    except (dist.DistError, RuntimeError, ValueError) as e:
        raise SystemExit(f"rank {res.rank}: could not join the other {res.world_size - 1} "
                         f"processes within {timeout} ({first_line(e)}); start every process "
                         "with torchrun and the same --rdzv-endpoint") from None
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not peer_gone(e):
            raise
        raise SystemExit(f"rank {res.rank}: another process of this run stopped, or did not "
                         f"answer within {timeout} ({first_line(e, 120)}); its own message "
                         "says why. The same command then resumes from the last checkpoint, "
                         "if there is one") from None
    finally:
        destroy()


def peer_gone(e: BaseException) -> bool:
    """Whether a collective failed because another rank left (rank 0 refused a run and
    exited, or died) or timed out: torch's DistError, or gloo's plain RuntimeError about a
    closed connection, which otherwise reached the user as a 100-line traceback."""
    if isinstance(e, dist.DistError):
        return True
    # Lost connections only: gloo's other errors (a tensor of the wrong size) are this
    # rank's own, and keep their traceback.
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                   "Broken pipe", "Timed out", "timed out"))


def destroy() -> None:
    global _wait_group
    if initialized():
        dist.destroy_process_group()
    _wait_group = None


def barrier() -> None:
    """Every rank waits here for the others (on the CPU group with the long timeout)."""
    if initialized():
        dist.barrier(group=_wait_group)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (it may build a cache, create files); then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process.
    On the CPU group: it works whatever the training backend, and waits as barrier does."""
    if not initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj, group=_wait_group)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (t itself in a single process)."""
    if initialized():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks."""
    return all_reduce_sum(t).div_(world()) if initialized() else t


def global_mean_var(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and unbiased variance over `dims` of the global batch: one
    all-reduce of the sum, sum of squares and count, in float64 (so a variance near 0, a
    collapse, still reads as one; a single process's two-pass statistics agree to rounding).
    No gradient flows back through the all-reduce."""
    xd = x.double()
    count = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float64)
    s = all_reduce_sum(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
    c, n = x.shape[1], s[-1]
    mean = s[:c] / n
    return mean, (s[c:2 * c] - n * mean * mean) / (n - 1)


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any rank (a signal one rank received)."""
    if not initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item())


# ----------------------------------------------------------------- models across processes
class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's output depends on every rank's input,
    so the gradient of the input is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    nn.SyncBatchNorm is the fast path on CUDA but refuses CPU tensors; this one (used on the
    CPU, e.g. gloo tests) all-reduces the per-channel sum, sum of squares and count with
    autograd (torch.distributed.nn), so gradients flow through the global statistics exactly
    as they do through one process's BN over the whole batch. Statistics in float64.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D to 5D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and initialized() and world() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        count = x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float64)
        s = _SumOverRanks.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        c = x.shape[1]
        n = s[-1]
        mean = s[:c] / n
        var = (s[c:2 * c] / n - mean * mean).clamp(min=0)  # biased: what BN normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm_(module: nn.Module, on_gpu: bool) -> nn.Module:
    """Swap every plain BatchNorm for one with global-batch statistics (SyncBatchNorm on CUDA,
    GlobalBatchNorm on the CPU), keeping its parameters and buffers (the same tensors).

    Only exact BatchNorm1d/2d are swapped: a method's own BN subclasses (the Cross target's
    MomentumBatchNorm) synchronise themselves.
    """
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            new = (nn.SyncBatchNorm if on_gpu else GlobalBatchNorm)(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm_(child, on_gpu)
    return module


def data_parallel(module: nn.Module, res) -> nn.Module:
    """The module whose forward averages gradients over ranks (DDP), or itself in one process.

    Frozen parameters (a target network) are not DDP's; buffers are not broadcast because
    every rank computes the same global statistics.
    """
    if not initialized() or world() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    on_gpu = res.device.startswith("cuda")
    import inspect

    no_sync = ({"forward_sync_buffers": False}  # newer torch's name for broadcast_buffers
               if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(module, device_ids=[torch.device(res.device).index] if on_gpu else None,
               **no_sync)
