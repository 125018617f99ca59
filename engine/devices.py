"""Host-to-device copies that never wait for the device.

A copy from pageable host memory to a CUDA device waits for the work already queued on the
stream (CUDA stages it synchronously), which would stall the host behind the step in
flight and undo async scheduling. Every per-step copy goes through :func:`to_device`: from
pinned memory (the caching host allocator makes ``pin_memory`` cheap), without blocking.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(data: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data)`` on ``device``, copied without waiting for the device."""
    return to_device(torch.tensor(data, dtype=dtype), device)
