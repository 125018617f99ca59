"""FP8 base weights: ``y = x W^T (+ bias)`` with ``W = qweight * scale`` (e4m3, 1 byte a weight).

Two GPU paths, chosen per call from the token count ``M`` (a host int: static in a CUDA graph):

- :func:`fp8_linear_w8a16` (small ``M``, decode): a Triton GEMM that loads the 1-byte weights,
  widens them in registers and runs bf16 tensor-core dots against the unquantized activations;
  the scale is applied to the accumulator (per output channel at the end; per ``[bn, bk]`` block
  at each K step). Split-K over a ``[SPLIT, M, N]`` float32 buffer when the N tiles alone do not
  fill the device. The weight bytes are what a decode step reads, so this is the path that can
  reach the 1-byte floor.
- :func:`fp8_linear_w8a8` (large ``M``, prefill): activations quantized per token (one Triton
  pass: row amax and the e4m3 cast) and ``torch._scaled_mm`` (cuBLASLt, row-wise scales) on the
  fp8 tensor cores. Per-channel (or per-tensor) weight scales only.

Scale layouts (``scale``): ``[N]`` float32 per output channel (a per-tensor scale is stored
expanded), or ``[cdiv(N, bn), cdiv(K, bk)]`` float32 blocks (``block=(bn, bk)``, the layout of
``weight_block_size`` checkpoints). :func:`fp8_linear_ref` is the reference (dequantize, then
matmul): the CPU path and the tests' oracle.

Triton's interpreter (3.6) runs the W8A16 kernel on float8 tensors exactly (loads and the
widening cast; a masked load needs a float ``other``), but its float32 -> e4m3 cast rounds some
values wrongly (127.5 -> 64), so :func:`quantize_rows` is tested on GPU only. No host syncs anywhere: every size comes from shapes, so both paths are CUDA-graph safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, next_pow2, num_sms, tl, triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[N, K]`` of ``dtype``: each weight times its scale (in float32)."""
    w = qweight.float()
    if block is None:
        w = w * scale.float()[:, None]
    else:
        bn, bk = block
        n, k = w.shape
        s = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        w = w * s
    return w.to(dtype)


def fp8_linear_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [N] or [cdiv(N, bn), cdiv(K, bk)] float32
    block: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [M, N] of x's dtype
    return F.linear(x, dequantize(qweight, scale, block, x.dtype), bias)


def quantize_rows_ref(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: ``([Mp, K] e4m3, [Mp, 1] float32 scales)``, each row
    scaled to its amax / 448; rows are padded with zeros up to a multiple of ``pad_to``."""
    M = x.shape[0]
    Mp = -(-M // pad_to) * pad_to
    xf = F.pad(x.float(), (0, 0, 0, Mp - M))
    s = (xf.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def fp8_linear_a8_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [N] float32
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [M, N] of x's dtype
    """What the weight-only kernel's ``a8`` configs compute: each token's activations in
    ``group``-wide K slices (the kernel's K step) quantized to e4m3 with their own scale."""
    M, K = x.shape
    xf = F.pad(x.float(), (0, -K % group)).view(M, -1, group)
    s = (xf.abs().amax(2, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    xd = ((xf / s).to(FP8).float() * s).view(M, -1)[:, :K]
    return F.linear(xd, dequantize(qweight, scale, None, torch.float32), bias).to(x.dtype)


if HAVE_TRITON:
    # M is not specialized on: one compiled variant serves every token count of a block size
    @triton.jit(do_not_specialize=["M"])
    def _fp8_w8a16_kernel(
        x_ptr,  # [M, K] bf16/fp16/fp32
        w_ptr,  # [N, K] e4m3
        s_ptr,  # [N] or [NB, KB] float32
        bias_ptr,  # [N] (HAS_BIAS)
        out_ptr,  # [M, N]
        ws_ptr,  # [SPLIT, M, N] float32 partials (SPLIT > 1)
        cnt_ptr,  # int32 arrival counts, one per output tile, zero between launches (FIXUP)
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        stride_sn,
        K_PER_SPLIT,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCKWISE: tl.constexpr,  # block scales [NB, KB]; else per channel [N]
        SCALE_BN: tl.constexpr,
        SCALE_BK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr,
        SWAP: tl.constexpr,  # the tile computed as W x^T (see below)
        A8: tl.constexpr,  # activations quantized per token and K step (FP8 x FP8 dots)
        FIXUP: tl.constexpr,  # SPLIT > 1: the last split reduces (else the caller does)
    ):
        # one program: a [BLOCK_M, BLOCK_N] output tile over one K slice. The grid is N-tiles
        # fastest so that the programs running together share the x rows (L2) and each reads
        # its own weight tile once. SWAP computes the tile transposed, ``W x^T`` ([BLOCK_N,
        # BLOCK_M]): the weight is then the dot's left operand, which Hopper's tensor-core dot
        # (wgmma) takes from registers, where widening leaves it (as the right operand it goes
        # back through shared memory), and the few tokens are the narrow side the instruction
        # allows (its left side is 64 rows). With A8 the weight stays e4m3 (FP8 x FP8 dots).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_hi
            xt = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wq = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if A8:  # this K step's activations to e4m3, one scale per token: FP8 dots
                xf = xt.to(tl.float32)
                xs = tl.maximum(tl.max(tl.abs(xf), axis=1) / 448.0, 1e-12)
                xq = (xf * (1.0 / xs)[:, None]).to(wq.dtype)
                if SWAP:
                    acc += tl.dot(wq, tl.trans(xq)) * xs[None, :]
                else:
                    acc += tl.dot(xq, tl.trans(wq)) * xs[:, None]
            else:
                wt = wq.to(xt.dtype)  # e4m3 -> the activations' type, in registers
                if SWAP:
                    if IEEE:
                        d = tl.dot(wt, tl.trans(xt), input_precision="ieee")
                    else:
                        d = tl.dot(wt, tl.trans(xt))
                elif IEEE:
                    d = tl.dot(xt, tl.trans(wt), input_precision="ieee")
                else:
                    d = tl.dot(xt, tl.trans(wt))
                if BLOCKWISE:  # BLOCK_K divides SCALE_BK: one scale column per step
                    sc = tl.load(
                        s_ptr + (offs_n // SCALE_BN) * stride_sn + k0 // SCALE_BK,
                        mask=mask_n,
                        other=0.0,
                    )
                    if SWAP:
                        acc += d * sc[:, None]
                    else:
                        acc += d * sc[None, :]
                else:
                    acc += d
        if not BLOCKWISE:
            sc = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
            if SWAP:
                acc = acc * sc[:, None]
            else:
                acc = acc * sc[None, :]
        # the tile's output offsets, in the accumulator's own orientation
        if SWAP:
            rows = offs_m.to(tl.int64)[None, :]
            cols = offs_n[:, None]
        else:
            rows = offs_m.to(tl.int64)[:, None]
            cols = offs_n[None, :]
        mask = (rows < M) & (cols < N)
        if SPLIT == 1:
            _fp8_finish(acc, out_ptr, bias_ptr, rows, cols, mask, stride_om, N, HAS_BIAS)
        else:
            tl.store(ws_ptr + (pid_k * M + rows) * N + cols, acc, mask=mask)
            if FIXUP:
                # the tile's last split to arrive sums the partials (from L2) and writes the
                # output: no second kernel. Its count goes back to zero for the next launch.
                tl.debug_barrier()  # every thread's partial stored before the arrival counts
                count = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
                if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                    acc = tl.zeros_like(acc)
                    for i in tl.static_range(SPLIT):
                        acc += tl.load(
                            ws_ptr + (i * M + rows) * N + cols,
                            mask=mask,
                            other=0.0,
                            cache_modifier=".cg",
                        )
                    _fp8_finish(acc, out_ptr, bias_ptr, rows, cols, mask, stride_om, N, HAS_BIAS)
                    tl.atomic_xchg(count, 0)

    @triton.jit
    def _fp8_finish(acc, out_ptr, bias_ptr, rows, cols, mask, stride_om, N, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _quant_rows_kernel(
        x_ptr,  # [M, K]
        q_ptr,  # [Mp, K] e4m3
        s_ptr,  # [Mp] float32
        M,
        K,
        stride_xm,
        stride_qm,
        BLOCK: tl.constexpr,
    ):
        # one program per row (rows past M are the padding: zeros, scale 1e-12)
        row = tl.program_id(0)
        live = row < M
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + kk, mask=(kk < K) & live, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        s = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        tl.store(s_ptr + row, s)
        inv = 1.0 / s
        q_row = q_ptr + row.to(tl.int64) * stride_qm
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + kk, mask=(kk < K) & live, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(v * inv, -448.0), 448.0)
            tl.store(q_row + kk, v.to(q_ptr.dtype.element_ty), mask=kk < K)


A8_MAX_TOKENS = 32  # steps of more tokens quantize activations for torch._scaled_mm instead


def fp8_mode(
    M: int, block: tuple[int, int] | None, dtype: torch.dtype, w8a8_min_tokens: int
) -> str:
    """How a GEMM of ``M`` tokens runs on an FP8 weight: ``"w8a16"`` (activations stay in
    their dtype: below ``w8a8_min_tokens``, for block scales, for activations other than bf16),
    ``"a8"`` (FP8 activations quantized inside the Triton GEMM, per token and K step: up to
    :data:`A8_MAX_TOKENS`) or ``"w8a8"`` (per-token quantization pass + ``torch._scaled_mm``).
    On the H200 the Triton GEMM with FP8 activations is the fastest up to 32 tokens (a
    Llama-3-8B layer's GEMMs at 32 tokens: 1.32x bf16's speed, the quantization pass and
    ``_scaled_mm`` 0.98x), cuBLASLt from 64 (docs/benchmarks.md, FP8)."""
    if block is not None or dtype != torch.bfloat16 or M < w8a8_min_tokens:
        return "w8a16"
    return "a8" if M <= A8_MAX_TOKENS else "w8a8"


def _block_k(bk: int, block: tuple[int, int] | None) -> int:
    """``bk``, halved until it divides the scale block's K side (a K step in one block)."""
    while block is not None and block[1] % bk and bk > 16:
        bk //= 2
    return bk


def default_w8a16_config(
    M: int,
    N: int,
    K: int,
    block: tuple[int, int] | None,
    on_gpu: bool,
    sms: int,
    a8: bool = False,
) -> dict[str, int]:
    """Launch config without a tuned entry, from the H200 sweep (``sweep_fp8_gemm.py``): the
    tile computed as ``W x^T`` (``swap``), the smallest M tile that holds the tokens, and the
    K split until the grid has 1.5 waves of programs (at most 8 splits, each of 4 K steps at
    least), its last split reducing. FP8 activations (``a8``): 128-wide N tiles, 128-deep K
    steps. Weight-only: up to 16 tokens 32-wide N tiles and 256-deep K steps without the
    swap, past that 64-wide N tiles swapped. Past 128 tokens [128, 128] tiles, 8 warps."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 128 else 128
    if not on_gpu:  # interpreter: small tiles so that tests walk several N and K steps
        return {"block_m": 16, "block_n": 16, "block_k": 16, "split": 1, "num_warps": 4}
    if bm == 128:  # prefill-sized (block-scaled weights, or W8A8 off): tensor-core tiles
        return {"block_m": 128, "block_n": 128, "block_k": _block_k(128, block), "split": 1,
                "num_warps": 8, "num_stages": 3}  # fmt: skip
    if a8:
        bn, bk, swap = 128, 128, 1
    elif bm == 16:
        bn, bk, swap = 32, _block_k(256, block), 0
    else:
        bn, bk, swap = 64, _block_k(128, block), 1
    tiles = cdiv(N, bn) * cdiv(M, bm)
    split = 1
    while 2 * tiles * split < 3 * sms and K // (split * 2) >= 4 * bk and split < 8:
        split *= 2
    return {"block_m": bm, "block_n": bn, "block_k": bk, "split": split, "num_warps": 4,
            "num_stages": 4, "swap": swap, "a8": int(a8), "fixup": int(split > 1)}  # fmt: skip


def fp8_candidates(M: int, block: tuple[int, int] | None, a8: bool = False) -> list[dict[str, int]]:
    """The launch configs the warm-up sweep tries for ``M`` tokens (GPU): eight per mode, so
    that a cold sweep of a model's four shapes at three token buckets compiles about 24
    variants; the H200 sweep's winners across Llama-3-8B's shapes (N tiles 32-128, K splits
    1-8 reduced by their last split, both tile orientations). Past 64 tokens, wide tiles;
    none whose pipeline outgrows an SM's shared memory."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    if bm == 128:  # prefill-sized steps (block scales, or FP8 activations off): wide tiles
        rows = [(0, 128, 128, 1, 8, 3), (0, 64, 128, 1, 4, 4), (1, 128, 128, 1, 8, 3),
                (0, 128, 64, 1, 4, 4), (0, 64, 64, 1, 4, 3)]  # fmt: skip
    elif a8:  # swap, block_n, block_k, split, warps, stages
        rows = [(1, 128, 128, 1, 4, 4), (1, 128, 128, 4, 4, 4), (1, 128, 128, 8, 4, 4),
                (1, 64, 128, 4, 4, 4), (1, 64, 128, 2, 4, 4), (1, 128, 128, 4, 8, 3),
                (1, 128, 128, 1, 8, 3), (0, 128, 128, 4, 4, 4)]  # fmt: skip
    else:
        rows = [(0, 32, 256, 1, 4, 4), (0, 32, 128, 4, 4, 4), (1, 64, 128, 1, 4, 4),
                (1, 64, 128, 4, 4, 4), (0, 64, 128, 8, 4, 4), (1, 64, 128, 2, 4, 4),
                (0, 64, 128, 1, 4, 4), (0, 128, 128, 1, 4, 4)]  # fmt: skip
    out = []
    for swap, bn, bk, split, warps, stages in rows:
        bk = _block_k(bk, block)
        cfg = {"block_m": bm, "block_n": bn, "block_k": bk, "split": split, "num_warps": warps,
               "num_stages": stages, "swap": swap, "a8": int(a8), "fixup": int(split > 1)}  # fmt: skip
        # what the pipeline stages hold (activations of 2 bytes, 1-byte weights) within the
        # 227 KiB of shared memory a Hopper SM gives a program, with room to spare
        smem = stages * (bm * bk * 2 + bn * bk)
        if (block is None or block[1] % bk == 0) and cfg not in out and smem <= 192 << 10:
            out.append(cfg)
    return out


def fp8_linear_w8a16(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [N] or [NB, KB] float32
    block: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    config: dict[str, int] | None = None,  # block_m/n/k, split, num_warps, num_stages
) -> torch.Tensor:  # [M, N] of x's dtype
    M, K = x.shape
    N, K2 = qweight.shape
    if K2 != K or qweight.dtype != FP8 or qweight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"qweight must be e4m3 [N, {K}] and x [M, {K}], last dims contiguous")
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError("scale must be contiguous float32")
    if block is None and scale.shape != (N,):
        raise ValueError(f"per-channel scale must be [{N}]")
    if block is not None and scale.shape != (cdiv(N, block[0]), cdiv(K, block[1])):
        raise ValueError(f"block scale must be [cdiv(N, {block[0]}), cdiv(K, {block[1]})]")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = dict(config or default_w8a16_config(M, N, K, block, x.is_cuda, _sms(x)))
    bm, bn, bk, split = cfg.pop("block_m"), cfg.pop("block_n"), cfg.pop("block_k"), cfg.pop("split")
    swap = bool(cfg.pop("swap", 0))
    a8 = bool(cfg.pop("a8", 0))
    fixup = bool(cfg.pop("fixup", 0))
    if a8 and block is not None:
        raise ValueError("a8 takes per-channel weight scales")
    if block is not None and block[1] % bk:
        raise ValueError(f"block_k {bk} must divide the scale block's {block[1]}")
    # each split a whole number of K steps (and of scale blocks' steps)
    k_per = cdiv(cdiv(K, split), bk) * bk
    split = cdiv(K, k_per)
    grid = (cdiv(N, bn), cdiv(M, bm), split)
    ws = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    counts = _arrival_counts(x.device, grid[0] * grid[1]) if split > 1 and fixup else None
    _fp8_w8a16_kernel[grid](
        x,
        qweight,
        scale,
        bias if bias is not None else scale,
        out,
        ws,
        counts if counts is not None else scale,
        M,
        N,
        K,
        x.stride(0),
        qweight.stride(0),
        out.stride(0),
        scale.stride(0),
        k_per,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        SPLIT=split,
        BLOCKWISE=block is not None,
        SCALE_BN=block[0] if block is not None else 1,
        SCALE_BK=block[1] if block is not None else 1,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        SWAP=swap,
        A8=a8,
        FIXUP=counts is not None,
        **cfg,
    )
    if split == 1 or counts is not None:
        return out
    y = ws.sum(0)
    if bias is not None:
        y += bias.float()
    return out.copy_(y)


_COUNTS = 1 << 15  # arrival counters per device: more tiles than any one launch has
_counts: dict[torch.device, list] = {}  # device -> [int32 zeros, next free index]


def _arrival_counts(device: torch.device, tiles: int) -> torch.Tensor | None:
    """``tiles`` zeroed int32 counters for a split launch whose last split reduces. They come
    from one buffer per device, handed out in turn (launches in flight at once, on two
    streams, get different ones); each launch leaves its counters at zero. None (the caller
    reduces) when the launch has more tiles than the buffer, or when the buffer would be
    first made inside a CUDA graph capture (its zeros must exist outside the graph)."""
    if tiles > _COUNTS:
        return None
    entry = _counts.get(device)
    if entry is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        entry = _counts[device] = [torch.zeros(_COUNTS, dtype=torch.int32, device=device), 0]
    buf, at = entry
    if at + tiles > _COUNTS:
        at = 0
    entry[1] = at + tiles
    return buf[at : at + tiles]


def quantize_rows(x: torch.Tensor, pad_to: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_ref` in one Triton pass (CUDA)."""
    M, K = x.shape
    Mp = -(-M // pad_to) * pad_to
    q = torch.empty(Mp, K, dtype=FP8, device=x.device)
    s = torch.empty(Mp, 1, dtype=torch.float32, device=x.device)
    if Mp:
        block = min(2048, next_pow2(K))
        _quant_rows_kernel[(Mp,)](x, q, s, M, K, x.stride(0), q.stride(0), BLOCK=block)
    return q, s


def fp8_linear_w8a8(
    x: torch.Tensor,  # [M, K] bf16/fp16
    qweight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [N] float32 per output channel
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [M, N] of x's dtype
    """Dynamic per-token activation scales, row-wise ``torch._scaled_mm`` (rows padded to 16)."""
    if scale.dim() != 1:
        raise ValueError("W8A8 takes per-channel weight scales")
    M = x.shape[0]
    xq, xs = quantize_rows(x) if x.is_cuda else quantize_rows_ref(x, 16)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=x.dtype)[
        :M
    ]
    return y if bias is None else y + bias


def _sms(x: torch.Tensor) -> int:
    return num_sms(x.device) if x.is_cuda else 1
