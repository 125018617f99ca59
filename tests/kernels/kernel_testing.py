"""Shared helpers of the kernel tests, imported first by each test module.

On a machine without CUDA the Triton kernels run in Triton's interpreter: TRITON_INTERPRET is
set here, before triton loads; if another test package imported the kernels first (compiled
mode), the op modules are reloaded so that their ``@triton.jit`` functions are rebuilt in
interpreter mode. (No conftest.py here: tests/engine imports ``conftest`` by name.)
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in list(sys.modules):
        if _name.startswith("loraplex.engine.kernels.") and _name.split(".")[-1] not in (
            "lora_meta",
            "_triton",
        ):
            importlib.reload(sys.modules[_name])

    # numpy >= 2.5 refuses int() of a one-element 1-d array, which the interpreter hands to
    # range() for a scalar loaded from memory (`for r in range(0, rank, BLOCK)`): use .item().
    from triton.runtime import interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


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
