"""RMSNorm, optionally fused with the residual add (returns the new residual too)."""

from __future__ import annotations

import torch


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
