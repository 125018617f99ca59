"""Decode attention over a paged KV cache, one query token per sequence, GQA.

Options of a layer (Gemma): ``window`` > 0 attends to the last ``window`` positions only
(the query's own included: keys ``> pos - window``), ``softcap`` > 0 caps the scaled scores
as ``softcap * tanh(score / softcap)`` before the softmax. Both are launch arguments (the
softcap a constexpr switch): fixed per layer, so CUDA graphs capture them, and the window
bounds the positions read on the device (no host sync, no copy of the block table).
"""

from __future__ import annotations

import torch

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, next_pow2, num_sms, tl, triton


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """[num_blocks, BS, Hkv, D] -> the first n positions of one sequence, [n, Hkv, D]."""
    bs = cache.shape[1]
    nb = (n + bs - 1) // bs
    return cache[block_table[:nb].long()].reshape(nb * bs, *cache.shape[2:])[:n]


NO_WINDOW = 1 << 30  # the kernels' window when a layer has none (keys > pos - NO_WINDOW)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, softcap: float = 0.0
):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D], mask [Lq, Lk] bool or None -> [Lq, Hq, D] (float32)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().transpose(0, 1).repeat_interleave(g, 0)  # [Hq, Lk, D]
    vf = v.float().transpose(0, 1).repeat_interleave(g, 0)
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
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
    window: int = 0,  # > 0: the last window positions only
    softcap: float = 0.0,  # > 0: scores capped by softcap * tanh(score / softcap)
) -> torch.Tensor:  # [B, Hq, D]
    out = torch.zeros_like(q)
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        if n <= 0:
            continue
        lo = max(0, n - window) if window > 0 else 0
        k = _gather_kv(k_cache, block_tables[b], n)[lo:]
        v = _gather_kv(v_cache, block_tables[b], n)[lo:]
        out[b] = _attend(q[b : b + 1], k, v, None, scale, softcap)[0].to(q.dtype)
    return out


if HAVE_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,  # [B, Hq, D]
        kc_ptr,  # [num_blocks, BS, Hkv, D]
        vc_ptr,
        bt_ptr,  # [B, MB]
        lens_ptr,  # [B]
        out_ptr,  # [B, Hq, D] (NUM_SPLITS == 1) or partial acc [B, Hq, S, D] float32
        ml_ptr,  # [B, Hq, S, 2] float32 (max, sum) partials (NUM_SPLITS > 1)
        scale,
        softcap,
        window,  # NO_WINDOW for none
        HKV,
        D,
        stride_qb,
        stride_qh,
        stride_bt,
        stride_ob,
        stride_oh,
        split_len,  # context positions per split (multiple of BLOCK_N)
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        IEEE: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        # program: one sequence b, one KV head (all GROUP query heads of it), one context
        # split of the positions it attends to (the last `window` of them, or all)
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        n_ctx = tl.load(lens_ptr + b)
        lo = tl.maximum(n_ctx - window, 0) + sp * split_len
        hi = tl.minimum(lo + split_len, n_ctx)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < GROUP
        mask_d = offs_d < D
        heads = kvh * GROUP + offs_g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        )
        q = (q.to(tl.float32) * scale).to(q.dtype)
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        row_stride = HKV * D
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            mask_n = pos < hi
            blk = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=mask_n, other=0)
            row = (blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * row_stride + kvh * D
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(kc_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            k, v = k.to(q.dtype), v.to(q.dtype)  # an FP8 cache: widened in registers
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if SOFTCAP:  # softcap * tanh(s / softcap), tanh(t) = 1 - 2 / (exp(2t) + 1)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        omask = mask_g[:, None] & mask_d[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o, out.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            base = (b * HKV * GROUP + heads) * NUM_SPLITS + sp  # [BLOCK_G]
            tl.store(out_ptr + base[:, None] * D + offs_d[None, :], acc, mask=omask)
            tl.store(ml_ptr + base * 2, m_i, mask=mask_g)
            tl.store(ml_ptr + base * 2 + 1, l_i, mask=mask_g)

    @triton.jit
    def _split_reduce_kernel(
        acc_ptr,  # [B*Hq, S, D] float32
        ml_ptr,  # [B*Hq, S, 2]
        out_ptr,  # [B, Hq, D]
        HQ,
        D,
        stride_ob,
        stride_oh,
        NUM_SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < NUM_SPLITS
        m = tl.load(ml_ptr + (bh * NUM_SPLITS + offs_s) * 2, mask=mask_s, other=float("-inf"))
        l_ = tl.load(ml_ptr + (bh * NUM_SPLITS + offs_s) * 2 + 1, mask=mask_s, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
        a = tl.load(
            acc_ptr + (bh * NUM_SPLITS + offs_s)[:, None] * D + offs_d[None, :],
            mask=mask_s[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        num = tl.sum(a * w[:, None], 0)
        den = tl.sum(l_ * w, 0)
        out = num / tl.where(den > 0, den, 1.0)
        b = bh // HQ
        h = bh % HQ
        tl.store(
            out_ptr + b * stride_ob + h * stride_oh + offs_d,
            out.to(out_ptr.dtype.element_ty),
            mask=offs_d < D,
        )


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32 (includes the current token)
    scale: float,
    window: int = 0,  # > 0: the last window positions only (module docstring)
    softcap: float = 0.0,  # > 0: scores capped (module docstring)
    num_splits: int | None = None,  # split-KV partitions (None: by max_blocks and batch)
    config: dict | None = None,  # tuning override: want (programs), block_n, num_warps, num_stages
) -> torch.Tensor:  # [B, Hq, D]
    B, hq, d = q.shape
    _, bs, hkv, d2 = k_cache.shape
    if d2 != d or hq % hkv or v_cache.shape != k_cache.shape or q.stride(2) != 1:
        raise ValueError("q [B, Hq, D] and caches [blocks, bs, Hkv, D] with Hq % Hkv == 0")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    if block_tables.shape[0] != B or context_lens.shape != (B,) or block_tables.stride(1) != 1:
        raise ValueError("block_tables [B, max_blocks] and context_lens [B]")
    out = torch.empty_like(q)
    if B == 0:
        return out
    group = hq // hkv
    cfg = config or {}
    block_n = cfg.get("block_n", 64 if q.is_cuda else 16)
    max_ctx = block_tables.shape[1] * bs  # static bound: no host sync, graph-safe
    if window > 0:
        max_ctx = min(max_ctx, window)  # splits cover the window, wherever it lies
    if num_splits is None:
        # split long contexts when the batch alone does not fill the GPU
        want = cfg.get("want", 2 * num_sms(q.device)) if q.is_cuda else 1
        num_splits = max(1, min(cdiv(want, B * hkv), cdiv(max_ctx, 512), 16))
    split_len = cdiv(cdiv(max_ctx, num_splits), block_n) * block_n
    num_splits = cdiv(max_ctx, split_len)
    common = dict(
        GROUP=group,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_D=max(16, next_pow2(d)),
        BLOCK_N=block_n,
        BLOCK_SIZE=bs,
        NUM_SPLITS=num_splits,
        IEEE=q.dtype == torch.float32,
        SOFTCAP=softcap > 0,
        num_warps=cfg.get("num_warps", 4),
    )
    if "num_stages" in cfg:
        common["num_stages"] = cfg["num_stages"]
    if num_splits == 1:
        acc, ml = out, out
        so_b, so_h = out.stride(0), out.stride(1)
    else:
        acc = torch.empty(B * hq, num_splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(B * hq, num_splits, 2, dtype=torch.float32, device=q.device)
        so_b = so_h = 0
    _paged_decode_kernel[(B, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml, scale, float(softcap),
        window if window > 0 else NO_WINDOW, hkv, d,
        q.stride(0), q.stride(1), block_tables.stride(0), so_b, so_h, split_len, **common,
    )  # fmt: skip
    if num_splits > 1:
        _split_reduce_kernel[(B * hq,)](
            acc, ml, out, hq, d, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=max(2, next_pow2(num_splits)),
            BLOCK_D=next_pow2(d),
        )  # fmt: skip
    return out
