"""Rotary embedding and the KV-cache write in one pass over a step's fused q/k/v rows.

``rope_cache(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads,
num_kv_heads, delta=None) -> q``: per token, ``x = qkv (+ delta)`` (added in float32: the
decode forward's q/k/v LoRA delta, computed beside the qkv GEMM), q and k rotated (neox
style, as :mod:`engine.kernels.rotary`: the first ``R`` dims of each head, ``R`` the cache's
width, all of them but in partial rotary), q written back into ``qkv`` and returned as a
``[T, Hq, D]`` view, the rotated k and v stored at the token's cache slot (``-1``: padding,
not stored). The k and v columns of ``qkv`` are undefined afterwards (the reference rotates
k in place there; the kernel leaves them); attention reads K and V from the cache.

One launch instead of three (the delta add, rotary, the cache write) per layer.

An FP8 cache (``float8_e4m3fn``, ``--kv-cache-dtype fp8``) stores K and V cast with a scale of
1 (vLLM's default without calibrated scales), saturated at +-448 (e4m3's largest finite).
"""

from __future__ import annotations

import torch

from loraplex.engine.kernels._triton import HAVE_TRITON, next_pow2, tl, triton
from loraplex.engine.kernels.kv_cache_write import FP8_KV, kv_cache_write_ref
from loraplex.engine.kernels.rotary import rotary_ref


def _split(qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
    T, width = qkv.shape
    d = width // (num_heads + 2 * num_kv_heads)
    qs, ks = num_heads * d, num_kv_heads * d
    q = qkv[:, :qs].reshape(T, num_heads, d)
    k = qkv[:, qs : qs + ks].reshape(T, num_kv_heads, d)
    v = qkv[:, qs + ks :].reshape(T, num_kv_heads, d)
    return q, k, v


def rope_cache_ref(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) D]
    positions: torch.Tensor,  # [T] int
    cos_sin_cache: torch.Tensor,  # [max_pos, R] float32, R <= D
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = not stored
    num_heads: int,
    num_kv_heads: int,
    delta: torch.Tensor | None = None,  # [T, (Hq + 2 Hkv) D]
) -> torch.Tensor:  # q [T, Hq, D], a view into qkv
    if delta is not None:
        qkv.copy_((qkv.float() + delta.float()).to(qkv.dtype))
    q, k, v = _split(qkv, num_heads, num_kv_heads)
    rotary_ref(q, k, positions, cos_sin_cache)
    kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


if HAVE_TRITON:

    @triton.jit
    def _to_cache(x, c_ty: tl.constexpr, SAT: tl.constexpr):
        """float32 -> the cache's type; FP8 caches saturate at e4m3's +-448."""
        if SAT:
            x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        return x.to(c_ty)

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr,
        d_ptr,
        pos_ptr,
        cs_ptr,
        kc_ptr,
        vc_ptr,
        slot_ptr,
        HQ,
        HKV,
        HALF,  # half the rotary dims
        D,  # head dim
        stride_t,
        stride_dt,
        stride_c,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HKV: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_DELTA: tl.constexpr,
        HAS_PASS: tl.constexpr,  # partial rotary: dims 2 * HALF .. D pass unturned
        SAT: tl.constexpr,  # an FP8 cache: values clamped to +-448 before the cast
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HALF
        cos = tl.load(cs_ptr + pos * stride_c + offs_d, mask=dmask, other=0.0)[None, :]
        sin = tl.load(cs_ptr + pos * stride_c + HALF + offs_d, mask=dmask, other=0.0)[None, :]
        row = qkv_ptr + t * stride_t
        drow = d_ptr + t * stride_dt
        # q: rotated in place
        offs_h = tl.arange(0, BLOCK_HQ)
        mq = (offs_h[:, None] < HQ) & dmask[None, :]
        pq = offs_h[:, None] * D + offs_d[None, :]
        x1 = tl.load(row + pq, mask=mq, other=0.0).to(tl.float32)
        x2 = tl.load(row + pq + HALF, mask=mq, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x1 += tl.load(drow + pq, mask=mq, other=0.0).to(tl.float32)
            x2 += tl.load(drow + pq + HALF, mask=mq, other=0.0).to(tl.float32)
        out_ty = qkv_ptr.dtype.element_ty
        tl.store(row + pq, (x1 * cos - x2 * sin).to(out_ty), mask=mq)
        tl.store(row + pq + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mq)
        offs_p = 2 * HALF + tl.arange(0, BLOCK_P)
        pmask = offs_p < D
        if HAS_PASS:
            if HAS_DELTA:  # q's unturned dims: only the delta to add
                mqp = (offs_h[:, None] < HQ) & pmask[None, :]
                pqp = offs_h[:, None] * D + offs_p[None, :]
                xp = tl.load(row + pqp, mask=mqp, other=0.0).to(tl.float32)
                xp += tl.load(drow + pqp, mask=mqp, other=0.0).to(tl.float32)
                tl.store(row + pqp, xp.to(out_ty), mask=mqp)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            c_ty = kc_ptr.dtype.element_ty
            offs_g = tl.arange(0, BLOCK_HKV)
            gmask = offs_g[:, None] < HKV
            mk = gmask & dmask[None, :]
            pk = HQ * D + offs_g[:, None] * D + offs_d[None, :]
            dst = slot * HKV * D + offs_g[:, None] * D + offs_d[None, :]
            k1 = tl.load(row + pk, mask=mk, other=0.0).to(tl.float32)
            k2 = tl.load(row + pk + HALF, mask=mk, other=0.0).to(tl.float32)
            if HAS_DELTA:
                k1 += tl.load(drow + pk, mask=mk, other=0.0).to(tl.float32)
                k2 += tl.load(drow + pk + HALF, mask=mk, other=0.0).to(tl.float32)
            tl.store(kc_ptr + dst, _to_cache(k1 * cos - k2 * sin, c_ty, SAT), mask=mk)
            tl.store(kc_ptr + dst + HALF, _to_cache(k2 * cos + k1 * sin, c_ty, SAT), mask=mk)
            if HAS_PASS:
                mkp = gmask & pmask[None, :]
                pkp = HQ * D + offs_g[:, None] * D + offs_p[None, :]
                kp = tl.load(row + pkp, mask=mkp, other=0.0).to(tl.float32)
                if HAS_DELTA:
                    kp += tl.load(drow + pkp, mask=mkp, other=0.0).to(tl.float32)
                dstp = slot * HKV * D + offs_g[:, None] * D + offs_p[None, :]
                tl.store(kc_ptr + dstp, _to_cache(kp, c_ty, SAT), mask=mkp)
            # v: the whole head, unturned
            offs_v = tl.arange(0, BLOCK_DV)
            mv = gmask & (offs_v[None, :] < D)
            pv = (HQ + HKV) * D + offs_g[:, None] * D + offs_v[None, :]
            v = tl.load(row + pv, mask=mv, other=0.0).to(tl.float32)
            if HAS_DELTA:
                v += tl.load(drow + pv, mask=mv, other=0.0).to(tl.float32)
            dstv = slot * HKV * D + offs_g[:, None] * D + offs_v[None, :]
            tl.store(vc_ptr + dstv, _to_cache(v, c_ty, SAT), mask=mv)


def rope_cache(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) D], last dimension contiguous
    positions: torch.Tensor,  # [T] int
    cos_sin_cache: torch.Tensor,  # [max_pos, R] float32, R <= D (partial rotary: R < D)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = not stored
    num_heads: int,
    num_kv_heads: int,
    delta: torch.Tensor | None = None,  # [T, (Hq + 2 Hkv) D]
) -> torch.Tensor:  # q [T, Hq, D], a view into qkv
    T, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if qkv.dim() != 2 or width % heads or (width // heads) % 2 or qkv.stride(1) != 1:
        raise ValueError("qkv must be [T, (Hq + 2 Hkv) * D] with an even D, last dim contiguous")
    d = width // heads
    if delta is not None and (delta.shape != qkv.shape or delta.stride(1) != 1):
        raise ValueError("delta must match qkv")
    if k_cache.shape[2:] != (num_kv_heads, d) or v_cache.shape != k_cache.shape:
        raise ValueError("caches must be [num_blocks, block_size, Hkv, D]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    if positions.shape != (T,) or slot_mapping.shape != (T,):
        raise ValueError("positions and slot_mapping must be [T]")
    rot = cos_sin_cache.shape[1]
    if rot > d or rot % 2 or cos_sin_cache.dtype != torch.float32:
        raise ValueError("cos_sin_cache must be float32 [max_pos, R], R even and <= D")
    if cos_sin_cache.stride(1) != 1:
        raise ValueError("cos_sin_cache needs a contiguous last dimension")
    if T:
        dl = delta if delta is not None else qkv
        _rope_cache_kernel[(T,)](
            qkv, dl, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
            num_heads, num_kv_heads, rot // 2, d, qkv.stride(0), dl.stride(0),
            cos_sin_cache.stride(0),
            BLOCK_HQ=next_pow2(num_heads),
            BLOCK_HKV=next_pow2(num_kv_heads),
            BLOCK_D=next_pow2(rot // 2),
            BLOCK_P=next_pow2(max(d - rot, 1)),
            BLOCK_DV=next_pow2(d),
            HAS_DELTA=delta is not None,
            HAS_PASS=rot < d,
            SAT=k_cache.dtype == FP8_KV,
        )  # fmt: skip
    return qkv[:, : num_heads * d].reshape(T, num_heads, d)
