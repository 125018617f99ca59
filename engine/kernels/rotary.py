"""Rotary position embedding, neox style (rotate halves), applied to q and k in place.

``cos_sin_cache[p] = cat(cos(p * inv_freq), sin(p * inv_freq))``, shape ``[max_pos, D]``
float32; build it with :func:`rotary_cos_sin_cache` from the model's (scaled) ``inv_freq``.
"""

from __future__ import annotations

import torch

from engine.kernels._triton import HAVE_TRITON, tl, triton


def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_pos: int) -> torch.Tensor:
    """inv_freq [D/2] -> cos_sin_cache [max_pos, D] float32."""
    t = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int
    cos_sin_cache: torch.Tensor,  # [max_pos, D]
):
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions.long()].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    q.copy_(_rope(q, cos, sin))
    k.copy_(_rope(k, cos, sin))
    return q, k


if HAVE_TRITON:

    @triton.jit
    def _rope_heads(
        x_ptr,
        stride_t,
        stride_h,
        t,
        n_heads,
        cos,
        sin,
        HALF,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
        p1 = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr,
        k_ptr,
        pos_ptr,
        cache_ptr,
        HQ,
        HKV,
        HALF,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_c,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HKV: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        cmask = offs_d < HALF
        cos = tl.load(cache_ptr + pos * stride_c + offs_d, mask=cmask, other=0.0)[None, :]
        sin = tl.load(cache_ptr + pos * stride_c + HALF + offs_d, mask=cmask, other=0.0)[None, :]
        _rope_heads(q_ptr, stride_qt, stride_qh, t, HQ, cos, sin, HALF, BLOCK_HQ, BLOCK_D)
        _rope_heads(k_ptr, stride_kt, stride_kh, t, HKV, cos, sin, HALF, BLOCK_HKV, BLOCK_D)


def rotary(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int
    cos_sin_cache: torch.Tensor,  # [max_pos, D] float32
):
    T, hq, d = q.shape
    if k.shape[0] != T or k.shape[2] != d or positions.shape != (T,) or d % 2:
        raise ValueError("q [T, Hq, D], k [T, Hkv, D], positions [T], even D")
    if cos_sin_cache.shape[1] != d or cos_sin_cache.dtype != torch.float32:
        raise ValueError("cos_sin_cache must be float32 [max_pos, D]")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin_cache.stride(1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dimension")
    if T:
        _rotary_kernel[(T,)](
            q,
            k,
            positions,
            cos_sin_cache,
            hq,
            k.shape[1],
            d // 2,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin_cache.stride(0),
            BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HKV=triton.next_power_of_2(k.shape[1]),
            BLOCK_D=triton.next_power_of_2(d // 2),
        )
    return q, k
