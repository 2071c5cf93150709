"""What every benchmark shares: honest timing, the machine's record, FLOP counting, JSON."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from sstl.engine.io import make_dir, save_json

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, steps: int, repeats: int) -> tuple[float, list[float]]:
    """Median over `repeats` of the mean time of `steps` calls, synchronised around each repeat.

    Call after warm-up: compilation and first-call costs are never inside the timed region.
    """
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), times


def machine() -> dict:
    from sstl.engine.record import environment

    env = environment()
    env["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return env


def peak_flops(device) -> tuple[float, str]:
    """The device's peak FLOP/s: the datasheet for known GPUs, else a measured matmul."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16.items():
            if key in name:
                return peak, f"datasheet bf16 dense ({key})"
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sec, _ = median_seconds(lambda: a @ b, device, steps=3, repeats=3)
    return 2 * n ** 3 / sec, f"measured {n}^3 {str(dtype).replace('torch.', '')} matmul"


def forward_flops(fn, *args) -> int:
    """FLOPs (2 x multiply-adds) of the matmuls and convolutions one call of fn performs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def write_json(result: dict, path) -> None:
    """A benchmark's results as the engine writes JSON (io.save_json): atomic, and strict (an
    undefined number is null, not a bare NaN that other readers reject)."""
    if path:
        make_dir(Path(path).expanduser().parent, "--json")
        save_json(result, Path(path).expanduser())
