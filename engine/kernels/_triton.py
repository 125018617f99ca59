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

import functools

import torch

if HAVE_TRITON:

    @triton.jit
    def prefetch_l2(ptrs, mask):
        """Ask L2 for the lines at ptrs (no registers written): weights a kernel will read
        after gdc_wait() start streaming while the previous kernel finishes."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [ptrs, mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

else:  # pragma: no cover
    prefetch_l2 = None


@functools.cache
def num_sms(device: torch.device) -> int:
    """The device's multiprocessor count (grids are sized in waves of it, never a constant)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes."""
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def pdl_ok(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (Hopper+): the next kernel's prologue overlaps this one's
    tail; kernels call gdc_wait() before reading what the previous kernel wrote."""
    return HAVE_TRITON and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


__all__ = [
    "HAVE_TRITON",
    "gdc_launch_dependents",
    "gdc_wait",
    "l2_bytes",
    "num_sms",
    "pdl_ok",
    "prefetch_l2",
    "tl",
    "triton",
]
