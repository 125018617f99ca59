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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints. (``triton.cdiv`` and ``triton.next_power_of_2`` are
    constexpr functions: called from the host, each unwraps its arguments first, a few us
    a call; the wrappers call them several times per launch.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= ``n`` (1 for ``n <= 1``), for host ints."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def tokens_at_132_sms(T: int, sms: int) -> int:
    """``T`` tokens on ``sms`` SMs as the batch that loads a 132-SM device (H100 SXM, H200)
    as much: the decode-graph launch rules of ``lora_shrink`` / ``lora_expand`` were
    measured there and compare this against their batch sizes."""
    return T * 132 // sms


@functools.cache
def num_sms(device: torch.device) -> int:
    """The device's multiprocessor count (grids are sized in waves of it, never a constant)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes."""
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def pdl_ok(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (Hopper+): the next kernel's prologue overlaps this one's
    tail; kernels call gdc_wait() before reading what the previous kernel wrote. (The
    capability is cached per device: asking the driver each launch cost ~5 us of the step
    loop's host time, twice per LoRA projection group and layer.)"""
    return HAVE_TRITON and t.is_cuda and _capability(t.device)[0] >= 9


__all__ = [
    "HAVE_TRITON",
    "cdiv",
    "gdc_launch_dependents",
    "gdc_wait",
    "l2_bytes",
    "next_pow2",
    "num_sms",
    "pdl_ok",
    "prefetch_l2",
    "tl",
    "triton",
]
