"""Write the new tokens' K and V into the paged cache at their slots: the torch reference (on
the GPU the forward writes inside :mod:`engine.kernels.rope_cache`). An FP8 cache
(``float8_e4m3fn``) takes the values as they are (scale 1), saturated at +-448."""

from __future__ import annotations

import torch


def kv_cache_write_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip (padding token)
) -> None:
    valid = slot_mapping >= 0
    idx = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[idx] = to_cache(k[valid], k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[idx] = to_cache(v[valid], v_cache.dtype)


FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = 448.0


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the cache's dtype: an FP8 cache (scale 1) saturates at e4m3's +-448."""
    if dtype == FP8_KV:
        x = x.float().clamp(-FP8_KV_MAX, FP8_KV_MAX)
    return x.to(dtype)
