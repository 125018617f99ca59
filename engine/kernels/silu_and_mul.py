"""SiLU-and-mul: ``silu(x[:, :I]) * x[:, I:]`` (the Llama MLP's gated activation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    i = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :i]) * xf[..., i:]).to(x.dtype)
