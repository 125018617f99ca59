"""Causal prefill attention for a variable-length batch, reading K/V from the paged cache."""

from __future__ import annotations

import torch

from engine.kernels.paged_decode_attention import _attend, _gather_kv


def prefill_attention_ref(
    q: torch.Tensor,  # [T, Hq, D] (sequences concatenated)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (already holds the new tokens)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_q_lens: torch.Tensor,  # [B+1] int32
    context_lens: torch.Tensor,  # [B] int32: cached + new tokens
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    out = torch.zeros_like(q)
    cu = cu_q_lens.tolist()
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        lq = q1 - q0
        if lq <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], n)
        v = _gather_kv(v_cache, block_tables[b], n)
        qpos = torch.arange(n - lq, n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
        out[q0:q1] = _attend(q[q0:q1], k, v, mask, scale).to(q.dtype)
    return out
