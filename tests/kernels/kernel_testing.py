"""Shared helpers of the kernel tests (the conftest sets interpreter mode first)."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None
):
    """Close by dtype: elementwise ``|out - ref| <= tol * (|ref| + max|ref|/8)``, and no NaN."""
    tol = TOL[dtype] if tol is None else tol
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape
    if out.numel() == 0:
        return
    assert not torch.isnan(out).any(), "NaN in output"
    scale = ref.abs().max().clamp_min(1e-6) / 8
    err = (out - ref).abs()
    bad = err > tol * (ref.abs() + scale)
    assert not bad.any(), (
        f"{int(bad.sum())} of {out.numel()} off; max err {err.max():.3g}, "
        f"rel norm {(err.norm() / ref.norm().clamp_min(1e-12)):.3g}"
    )


@pytest.fixture
def device() -> str:
    return DEVICE


def gpu(fn):
    """Mark a test as needing CUDA (real sizes, bf16): skipped without it."""
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn)
    return pytest.mark.gpu(fn)
