"""Causal prefill attention for a variable-length batch, reading K/V from the paged cache.

``window`` and ``softcap``: as in :mod:`engine.kernels.paged_decode_attention` (a query at
position p attends to keys in ``(p - window, p]``).
"""

from __future__ import annotations

import torch

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, next_pow2, tl, triton
from loraplex.engine.kernels.paged_decode_attention import NO_WINDOW, _attend, _gather_kv


def prefill_attention_ref(
    q: torch.Tensor,  # [T, Hq, D] (sequences concatenated)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (already holds the new tokens)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_q_lens: torch.Tensor,  # [B+1] int32
    context_lens: torch.Tensor,  # [B] int32: cached + new tokens
    scale: float,
    window: int = 0,  # > 0: keys within the last window positions of each query
    softcap: float = 0.0,  # > 0: scores capped by softcap * tanh(score / softcap)
    out: torch.Tensor | None = None,  # [T, Hq, D] written in place (see prefill_attention)
) -> torch.Tensor:  # [T, Hq, D]
    if out is None:
        out = torch.zeros_like(q)
    cu = cu_q_lens.tolist()
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        lq = q1 - q0
        if lq <= 0:
            continue
        # from the first query's window on: a block before it may have been given back
        lo = max(0, n - lq - window + 1) if window > 0 else 0
        k = _gather_kv(k_cache, block_tables[b], n)[lo:]
        v = _gather_kv(v_cache, block_tables[b], n)[lo:]
        qpos = torch.arange(n - lq, n, device=q.device)
        kpos = torch.arange(lo, n, device=q.device)[None, :]
        mask = kpos <= qpos[:, None]
        if window > 0:
            mask &= kpos > qpos[:, None] - window
        out[q0:q1] = _attend(q[q0:q1], k, v, mask, scale, softcap).to(q.dtype)
    return out


if HAVE_TRITON:

    @triton.jit
    def _prefill_kernel(
        q_ptr,  # [T, Hq, D]
        kc_ptr,  # [num_blocks, BS, Hkv, D]
        vc_ptr,
        bt_ptr,  # [B, MB]
        cu_ptr,  # [B+1]
        lens_ptr,  # [B]
        out_ptr,  # [T, Hq, D]
        scale,
        softcap,
        window,  # NO_WINDOW for none
        HKV,
        D,
        stride_qt,
        stride_qh,
        stride_bt,
        stride_ot,
        stride_oh,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        # program: BLOCK_M queries of sequence b, one query head
        mb = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        h = tl.program_id(2)
        q0 = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q0
        if mb * BLOCK_M >= q_len:
            return
        n_ctx = tl.load(lens_ptr + b)
        kvh = h // GROUP
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_len
        qpos = n_ctx - q_len + offs_m  # absolute positions of these queries
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        rows = (q0 + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        q = (q.to(tl.float32) * scale).to(q.dtype)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        row_stride = HKV * D
        hi = tl.minimum(n_ctx, n_ctx - q_len + (mb + 1) * BLOCK_M)  # causal bound of this block
        lo = tl.maximum(n_ctx - q_len + mb * BLOCK_M - window + 1, 0)  # the window's bound
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            mask_n = pos < hi
            blk = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=mask_n, other=0)
            kv_row = (blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * row_stride + kvh * D
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(kc_ptr + kv_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + kv_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache: widened in registers
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if SOFTCAP:  # softcap * tanh(s / softcap), tanh(t) = 1 - 2 / (exp(2t) + 1)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            seen = (pos[None, :] <= qpos[:, None]) & (pos[None, :] > qpos[:, None] - window)
            s = tl.where(mask_n[None, :] & seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D] (sequences concatenated)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous, holds the new tokens
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_q_lens: torch.Tensor,  # [B+1] int32
    context_lens: torch.Tensor,  # [B] int32: cached + new tokens
    scale: float,
    max_q_len: int | None = None,  # host bound on query lengths (else one host sync)
    window: int = 0,  # > 0: keys within the last window positions of each query
    softcap: float = 0.0,  # > 0: scores capped (module docstring)
    out: torch.Tensor | None = None,  # [T, Hq, D] to write (a CUDA graph's static buffer)
) -> torch.Tensor:  # [T, Hq, D]
    """``out``: rows past ``cu_q_lens[-1]`` (a padded step's) are left as they are."""
    T, hq, d = q.shape
    _, bs, hkv, d2 = k_cache.shape
    B = context_lens.shape[0]
    if d2 != d or hq % hkv or v_cache.shape != k_cache.shape or q.stride(2) != 1:
        raise ValueError("q [T, Hq, D] and caches [blocks, bs, Hkv, D] with Hq % Hkv == 0")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    if cu_q_lens.shape != (B + 1,) or block_tables.shape[0] != B or block_tables.stride(1) != 1:
        raise ValueError("cu_q_lens [B+1], block_tables [B, max_blocks], context_lens [B]")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError("out must be [T, Hq, D] of q's dtype with a contiguous last dim")
    if T == 0 or B == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max())
    block_m = 64 if q.is_cuda else 16
    block_n = 64 if q.is_cuda else 16
    grid = (cdiv(max_q_len, block_m), B, hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, out, scale, float(softcap),
        window if window > 0 else NO_WINDOW, hkv, d,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(d)), BLOCK_SIZE=bs,
        IEEE=q.dtype == torch.float32, SOFTCAP=softcap > 0, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
