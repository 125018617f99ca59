"""Decode attention over a paged KV cache, one query token per sequence, GQA."""

from __future__ import annotations

import torch


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """[num_blocks, BS, Hkv, D] -> the first n positions of one sequence, [n, Hkv, D]."""
    bs = cache.shape[1]
    nb = (n + bs - 1) // bs
    return cache[block_table[:nb].long()].reshape(nb * bs, *cache.shape[2:])[:n]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D], mask [Lq, Lk] bool or None -> [Lq, Hq, D] (float32)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().transpose(0, 1).repeat_interleave(g, 0)  # [Hq, Lk, D]
    vf = v.float().transpose(0, 1).repeat_interleave(g, 0)
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vf).transpose(0, 1)


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32 (includes the current token)
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    out = torch.zeros_like(q)
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        if n <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], n)
        v = _gather_kv(v_cache, block_tables[b], n)
        out[b] = _attend(q[b : b + 1], k, v, None, scale)[0].to(q.dtype)
    return out
