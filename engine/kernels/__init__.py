"""Ops of the engine: Triton kernels on CUDA, pure-torch references elsewhere.

Each op lives in ``<op>.py`` with its Triton host wrapper ``<op>`` and its reference
``<op>_ref`` (same signature). The functions here pick one per call: the reference on CPU or
when triton is missing, Triton on CUDA. ``LORAPLEX_KERNELS=ref|triton`` forces a side
(read per call, so tests and benchmarks can switch).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from loraplex.engine.kernels import fp8_linear as _fp8
from loraplex.engine.kernels import fused_moe as _moe
from loraplex.engine.kernels import lora_expand as _expand
from loraplex.engine.kernels import lora_shrink as _shrink
from loraplex.engine.kernels import lora_silu_and_mul as _lora_act
from loraplex.engine.kernels import paged_decode_attention as _decode
from loraplex.engine.kernels import prefill_attention as _prefill
from loraplex.engine.kernels import rms_norm as _rms
from loraplex.engine.kernels import rope_cache as _rope_cache
from loraplex.engine.kernels import silu_and_mul as _silu
from loraplex.engine.kernels._triton import HAVE_TRITON
from loraplex.engine.kernels.lora_meta import LoraMeta, build_lora_meta
from loraplex.engine.kernels.rotary import rotary_cos_sin_cache


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` should run the Triton kernel."""
    mode = os.environ.get("LORAPLEX_KERNELS", "")
    if mode == "ref":
        return False
    if mode == "triton":
        return HAVE_TRITON
    return HAVE_TRITON and t.is_cuda


def _pick(mod, name: str, t: torch.Tensor):
    fn = getattr(mod, name, None) if use_triton(t) else None
    return fn if fn is not None else getattr(mod, name + "_ref")


def lora_shrink(
    x,
    lora_a,
    ranks,
    pages,
    meta: LoraMeta,
    early_launch: bool = True,
    max_rank: int | None = None,
    row_div: int = 1,
    config: dict | None = None,
) -> torch.Tensor:
    """``early_launch``: a launch option of the Triton kernel (see there), not of the math.
    ``max_rank``: the step's largest adapter rank (host int; None: the pool's), which sizes
    the partials on the segment path. ``row_div``: token ``t`` reads ``x[t // row_div]``
    (the MoE layer's pairs). ``config``: a launch-config override of the Triton kernel (a
    tuned entry, :mod:`~loraplex.engine.kernels.tuning`); the reference ignores it."""
    if use_triton(x):
        return _shrink.lora_shrink(
            x, lora_a, ranks, pages, meta, config=config, early_launch=early_launch,
            max_rank=max_rank, row_div=row_div,
        )  # fmt: skip
    return _shrink.lora_shrink_ref(x, lora_a, ranks, pages, meta, max_rank, row_div)


def lora_expand(
    buf,
    lora_b,
    ranks,
    pages,
    out_offsets: Sequence[int],
    meta: LoraMeta,
    y,
    accumulate: bool = True,
    early_launch: bool = True,
    b_offsets: Sequence[int] | None = None,
    config: dict | None = None,
):
    args = (buf, lora_b, ranks, pages, out_offsets, meta, y)
    if use_triton(y):
        return _expand.lora_expand(
            *args, config=config, accumulate=accumulate, early_launch=early_launch,
            b_offsets=b_offsets,
        )  # fmt: skip
    return _expand.lora_expand_ref(*args, accumulate=accumulate, b_offsets=b_offsets)


def lora_silu_and_mul(
    gu,
    buf,
    lora_b,
    ranks,
    pages,
    meta: LoraMeta,
    gelu: bool = False,
    b_offsets: Sequence[int] | None = None,
):
    """The gate/up group's LoRA expand (``buf``: its shrink's partials) added to the GEMM's
    output ``gu`` inside the gated activation -> ``[T, I]``; ``gelu``: GeGLU."""
    fn = _pick(_lora_act, "lora_silu_and_mul", gu)
    return fn(gu, buf, lora_b, ranks, pages, meta, gelu, b_offsets)


def moe_blocks(topk_ids, num_experts: int) -> _moe.MoeBlocks | None:
    """The pairs sorted by expert for :func:`moe_gemm` (None on the reference path)."""
    if not use_triton(topk_ids):
        return None
    n = topk_ids.numel()
    return _moe.moe_blocks(topk_ids, num_experts, _moe.moe_block_m(n, num_experts))


def moe_gemm(x, w, topk_ids, pairs_input: bool, blocks: _moe.MoeBlocks | None = None):
    if blocks is None and use_triton(x):
        blocks = moe_blocks(topk_ids, w.shape[0])
    return _pick(_moe, "moe_gemm", x)(x, w, topk_ids, pairs_input, blocks)


def fp8_ok(t: torch.Tensor) -> bool:
    """FP8 kernels for tensor ``t``: Triton on a GPU with FP8 (compute capability >= 8.9),
    or forced with LORAPLEX_KERNELS=triton (the interpreter on CPU)."""
    if not use_triton(t):
        return False
    return not t.is_cuda or _capability(t.device) >= (8, 9)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def fp8_linear(
    x,
    qweight,
    scale,
    block: tuple[int, int] | None = None,
    bias=None,
    *,
    w8a8_min_tokens: int = 1,
    config: dict | None = None,
):
    """``x W^T + bias`` of an FP8 weight, as :func:`fp8_linear.fp8_mode` says for the step's
    token count: the weight-only Triton GEMM, the Triton GEMM with FP8 activations (``a8``),
    or per-token FP8 activations and ``torch._scaled_mm`` (CUDA). ``config``: the Triton
    GEMM's launch config (None: defaults); its ``a8`` is set by the mode, never by the
    config. Elsewhere the dequantizing reference."""
    if not fp8_ok(x):
        return _fp8.fp8_linear_ref(x, qweight, scale, block, bias)
    mode = _fp8.fp8_mode(x.shape[0], block, x.dtype, w8a8_min_tokens) if x.is_cuda else "w8a16"
    if mode == "w8a8":
        return _fp8.fp8_linear_w8a8(x, qweight, scale, bias)
    a8 = mode == "a8"
    if config is None:
        M, K = x.shape
        config = _fp8.default_w8a16_config(
            M, qweight.shape[0], K, block, x.is_cuda, _fp8._sms(x), a8=a8
        )
    elif bool(config.get("a8", 0)) != a8:
        config = {**config, "a8": int(a8)}
    return _fp8.fp8_linear_w8a16(x, qweight, scale, block, bias, config)


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, context_lens, scale: float, window=0, softcap=0.0
):
    """``window`` / ``softcap``: a layer's sliding window and score cap (0: none)."""
    fn = _pick(_decode, "paged_decode_attention", q)
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap)


def prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_q_lens,
    context_lens,
    scale: float,
    max_q_len=None,
    window=0,
    softcap=0.0,
    out=None,
):
    """``max_q_len``: the longest query of the batch, known on the host (the Triton path
    sizes its grid from it; without it, it reads it back from the device: one sync).
    ``window`` / ``softcap``: a layer's sliding window and score cap (0: none). ``out``:
    written in place (``[T, Hq, D]``; rows past the batch's tokens are left as they are)."""
    args = (q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, scale)
    fn = _pick(_prefill, "prefill_attention", q)
    if fn is _prefill.prefill_attention_ref:
        return fn(*args, window=window, softcap=softcap, out=out)
    return fn(*args, max_q_len=max_q_len, window=window, softcap=softcap, out=out)


def rms_norm(x, weight, eps: float, residual=None):
    return _pick(_rms, "rms_norm", x)(x, weight, eps, residual)


def rope_cache(
    qkv,
    positions,
    cos_sin_cache,
    k_cache,
    v_cache,
    slot_mapping,
    num_heads,
    num_kv_heads,
    delta=None,
):
    fn = _pick(_rope_cache, "rope_cache", qkv)
    args = (qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    return fn(*args, num_heads, num_kv_heads, delta=delta)


def silu_and_mul(x, delta=None, gelu: bool = False):
    """``gelu``: GeGLU (gelu, tanh approximation, in place of SiLU: Gemma)."""
    return _pick(_silu, "silu_and_mul", x)(x, delta, gelu=gelu)


__all__ = [
    "LoraMeta",
    "build_lora_meta",
    "fp8_linear",
    "fp8_ok",
    "lora_expand",
    "lora_shrink",
    "lora_silu_and_mul",
    "moe_blocks",
    "moe_gemm",
    "paged_decode_attention",
    "prefill_attention",
    "rms_norm",
    "rope_cache",
    "rotary_cos_sin_cache",
    "silu_and_mul",
    "use_triton",
]
