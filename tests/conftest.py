"""Shared test set-up.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter: the variable must
be set before triton is first imported, hence here, at collection time, for the whole suite.
On a CUDA machine the kernels run compiled (the interpreter cannot run them on GPU tensors);
importing torch does not import triton, so asking torch first is safe.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SSTL_PLAIN_LOG", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CXR_SMALL = SHARED / "cxr-small"
CXR_DEV = SHARED / "cxr-dev"
needs_shared = pytest.mark.skipif(
    not (CXR_SMALL / "manifest.csv").exists(),
    reason=f"real chest X-rays not found at {CXR_SMALL} (../shared/data is present in CI, "
           "not in user checkouts)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own decode cache unless a test points elsewhere."""
    monkeypatch.setenv("SSTL_CACHE", str(tmp_path_factory.getbasetemp() / "sstl-cache"))
