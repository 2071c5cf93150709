"""Triton, when it is installed. CPU-only installs get stand-ins that let the kernels be
defined (never launched): the dispatcher then always picks the torch references."""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False

__all__ = ["triton", "tl", "HAS_TRITON"]
