"""Host-to-device copies that never wait for the device.

A copy from pageable host memory to a CUDA device waits for the work already queued on the
stream (CUDA stages it synchronously), which would stall the host behind the step in
flight and undo async scheduling. Every per-step copy goes through :func:`to_device`: from
pinned memory (the caching host allocator makes ``pin_memory`` cheap), without blocking.

:func:`configure_pinned_memory` sets how that allocator gets new pinned memory.
"""

from __future__ import annotations

import os

import torch

# New pinned host memory as malloc + cudaHostRegister, its pages faulted in by 8 threads,
# instead of one cudaHostAlloc: on the H200 host, a new 80 MiB buffer (one rank-16 adapter
# of an 8B model) takes 16.7 ms instead of 71 ms, and four loader threads get 11.2 GB/s of
# new pinned memory instead of 1.3 (bench_adapter_scale.py --sections pin,
# docs/benchmarks.md). Every cold adapter load takes a new buffer until the host tier is full.
PINNED_ALLOC_SETTINGS = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def configure_pinned_memory() -> str | None:
    """Apply :data:`PINNED_ALLOC_SETTINGS` to torch's pinned host allocator, unless the
    operator's own ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` sets a ``pinned_``
    option. Returns the settings applied (None: left as they were). Other allocator
    options are not touched. Call it before the first pinned allocation."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if "pinned_" in os.environ.get(var, ""):
            return None
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # pragma: no cover - older torch
        return None
    setter(PINNED_ALLOC_SETTINGS)
    return PINNED_ALLOC_SETTINGS


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(data: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data)`` on ``device``, copied without waiting for the device."""
    return to_device(torch.tensor(data, dtype=dtype), device)
