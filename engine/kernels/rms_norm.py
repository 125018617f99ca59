"""RMSNorm, optionally fused with the residual add (returns the new residual too)."""

from __future__ import annotations

import torch

from loraplex.engine.kernels._triton import HAVE_TRITON, next_pow2, tl, triton


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
):
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    out = out.to(x.dtype)
    if residual is None:
        return out
    return out, h.to(x.dtype)


if HAVE_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,  # residual in (unused without HAS_RES)
        w_ptr,
        out_ptr,
        res_out_ptr,  # x + residual out (unused without HAS_RES)
        H,
        eps,
        stride_x,
        stride_r,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        h = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(res_ptr + t * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_out_ptr + t * H + offs, h.to(res_out_ptr.dtype.element_ty), mask=mask)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + offs, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
):
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError("x must be [T, H] (last dim contiguous) and weight [H]")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError("residual must match x")
    T, H = x.shape
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if T:
        block = next_pow2(H)
        _rms_norm_kernel[(T,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            H,
            eps,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return out if residual is None else (out, res_out)
