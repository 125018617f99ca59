"""Rotary position embedding, neox style (rotate halves), applied to q and k in place.

The torch reference and the cos/sin cache; on the GPU the forward rotates inside
:mod:`engine.kernels.rope_cache` (rotary + the KV-cache write in one kernel).

``cos_sin_cache[p] = cat(cos(p * inv_freq), sin(p * inv_freq))``, shape ``[max_pos, R]``
float32; build it with :func:`rotary_cos_sin_cache` from the model's (scaled) ``inv_freq``.
``R`` is the rotary dims of a head: ``D`` but in partial rotary (Phi-4-mini), where only
the first ``R`` dims of each head turn (neox style within them) and the rest pass.
"""

from __future__ import annotations

import torch


def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_pos: int, scale: float = 1.0) -> torch.Tensor:
    """inv_freq [R/2] -> cos_sin_cache [max_pos, R] float32; ``scale`` multiplies both
    (longrope's attention factor, as transformers applies it)."""
    t = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    out = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return out * scale if scale != 1.0 else out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int
    cos_sin_cache: torch.Tensor,  # [max_pos, R], R <= D
):
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    q[..., :rot].copy_(_rope(q[..., :rot], cos, sin))
    k[..., :rot].copy_(_rope(k[..., :rot], cos, sin))
    return q, k
