"""Optional triton import: the engine runs on CPU (references) without it."""

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    gdc_wait = gdc_launch_dependents = None  # type: ignore[assignment]
    HAVE_TRITON = False

import torch


def pdl_ok(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (Hopper+): the next kernel's prologue overlaps this one's
    tail; kernels call gdc_wait() before reading what the previous kernel wrote."""
    return HAVE_TRITON and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


__all__ = ["HAVE_TRITON", "gdc_launch_dependents", "gdc_wait", "pdl_ok", "tl", "triton"]
