"""Write the new tokens' K and V into the paged cache at their slots: the torch reference (on
the GPU the forward writes inside :mod:`engine.kernels.rope_cache`)."""

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
    k_cache.view(-1, *k_cache.shape[2:])[idx] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[idx] = v[valid].to(v_cache.dtype)
