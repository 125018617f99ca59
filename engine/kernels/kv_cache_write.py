"""Write the new tokens' K and V into the paged cache at their slots."""

from __future__ import annotations

import torch

from engine.kernels._triton import HAVE_TRITON, tl, triton


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


if HAVE_TRITON:

    @triton.jit
    def _kv_write_kernel(
        k_ptr,
        v_ptr,
        kc_ptr,
        vc_ptr,
        slot_ptr,
        HKV,
        D,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot < 0:
            return
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < HKV) & (offs_d[None, :] < D)
        src = offs_h[:, None] * stride_kh + offs_d[None, :]
        dst = slot * HKV * D + offs_h[:, None] * D + offs_d[None, :]
        kv = tl.load(k_ptr + t * stride_kt + src, mask=mask)
        tl.store(kc_ptr + dst, kv.to(kc_ptr.dtype.element_ty), mask=mask)
        src = offs_h[:, None] * stride_vh + offs_d[None, :]
        vv = tl.load(v_ptr + t * stride_vt + src, mask=mask)
        tl.store(vc_ptr + dst, vv.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_cache_write(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip (padding token)
) -> None:
    T, hkv, d = k.shape
    if v.shape != k.shape or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("k and v must be [T, Hkv, D] with a contiguous last dimension")
    if k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError("caches must be [num_blocks, block_size, Hkv, D]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or slot_mapping.shape != (T,):
        raise ValueError("caches must be contiguous, slot_mapping [T]")
    if T:
        _kv_write_kernel[(T,)](
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            hkv,
            d,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            BLOCK_H=triton.next_power_of_2(hkv),
            BLOCK_D=triton.next_power_of_2(d),
        )
