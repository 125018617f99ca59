"""SiLU-and-mul: ``silu(x[:, :I]) * x[:, I:]`` (the Llama MLP's gated activation).

With ``delta`` (same shape as ``x``), the activation of ``x + delta`` (added in float32): the
decode forward computes the gate/up LoRA delta beside the base GEMM and adds it here rather
than in a launch of its own.

With ``gelu=True``: GeGLU, ``gelu(x[:, :I]) * x[:, I:]`` with gelu's tanh approximation
(transformers' ``gelu_pytorch_tanh``: Gemma's MLP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, next_pow2, tl, triton


def silu_and_mul_ref(
    x: torch.Tensor, delta: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    i = x.shape[-1] // 2  # [T, 2I] -> [T, I]
    xf = x.float() if delta is None else x.float() + delta.float()
    act = F.gelu(xf[..., :i], approximate="tanh") if gelu else F.silu(xf[..., :i])
    return (act * xf[..., i:]).to(x.dtype)


if HAVE_TRITON:

    @triton.jit
    def _act(g, u, GELU: tl.constexpr):
        """float32 ``silu(g) * u``, or with ``GELU`` ``gelu_tanh(g) * u`` (also the fused
        LoRA activation's, ``lora_silu_and_mul``)."""
        if GELU:  # 0.5 g (1 + tanh(z)) = g sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            return g / (1.0 + tl.exp(-2.0 * z)) * u
        return g / (1.0 + tl.exp(-g)) * u

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,
        d_ptr,
        out_ptr,
        n_inner,
        stride_x,
        stride_d,
        stride_o,
        BLOCK: tl.constexpr,
        HAS_DELTA: tl.constexpr,
        GELU: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_inner
        g = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + t * stride_x + n_inner + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            g += tl.load(d_ptr + t * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
            u += tl.load(d_ptr + t * stride_d + n_inner + offs, mask=mask, other=0.0).to(tl.float32)
        out = _act(g, u, GELU)
        tl.store(out_ptr + t * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor, delta: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError("x must be [T, 2I] with a contiguous last dimension")
    if delta is not None and (delta.shape != x.shape or delta.stride(1) != 1):
        raise ValueError("delta must match x")
    T, I2 = x.shape
    i = I2 // 2
    out = torch.empty(T, i, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block = min(1024, next_pow2(i))
    d = delta if delta is not None else x
    _silu_and_mul_kernel[(T, cdiv(i, block))](
        x,
        d,
        out,
        i,
        x.stride(0),
        d.stride(0),
        out.stride(0),
        BLOCK=block,
        HAS_DELTA=delta is not None,
        GELU=gelu,
    )
    return out
