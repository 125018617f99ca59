"""The gate/up LoRA expand fused into the gated activation, for the segment path.

``out = act(gu[:, :I] + dg) * (gu[:, I:] + du)``, where ``(dg, du)`` is the gate/up group's
LoRA delta (``lora_expand`` of the shrink's partials ``buf``) and ``act`` is SiLU (or GeGLU's
tanh gelu). In line, the expand reads and rewrites the whole ``[T, 2I]`` GEMM output to add
its delta, and the activation then reads it again: at a prefill step of 8,192 tokens on
Llama-3-8B that is 0.94 GB a layer, more than the layer's weights. Here one pass reads
``gu`` once, computes each tile's delta from the partials and the adapter's B (tensor-core
dots over a tile of one adapter's tokens, as ``lora_expand``'s segment kernel) and writes
only the activation, so the expand costs its B reads and nothing else.

Grid ``(NT + cdiv(T, BLOCK_M), N ranges)``: the meta's tiles (tokens of one adapter), then
blocks of ``BLOCK_M`` token indices whose rows without an adapter (``token_slot < 0``) take the
plain activation; every row is written once. Static for a given ``T`` and meta shape, so it
is CUDA-graph safe like the SGMV kernels. The decode graphs keep the delta beside the GEMM
(``silu_and_mul(gu, delta)``); this is for steps that run the LoRA in line.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, next_pow2, num_sms, tl, triton
from loraplex.engine.kernels.lora_expand import lora_expand_ref
from loraplex.engine.kernels.lora_meta import LoraMeta
from loraplex.engine.kernels.silu_and_mul import silu_and_mul_ref


def lora_silu_and_mul_ref(
    gu: torch.Tensor,  # [T, 2I] the base GEMM's gate/up output
    buf: torch.Tensor,  # [KS, 2, T, R] float32 partials (lora_shrink's)
    lora_b: torch.Tensor,  # [U, 2I, PAGE_ROWS] (the pool's strided view; scale folded in)
    ranks: torch.Tensor,  # [slots, 2] int32
    pages: torch.Tensor,  # [slots, 2, MAXP] int32
    meta: LoraMeta,
    gelu: bool = False,
    b_offsets: Sequence[int] | None = None,  # [2] element offsets of each projection's B
) -> torch.Tensor:  # [T, I]
    """The delta in float32 (not rounded to ``gu``'s dtype before the activation)."""
    i = gu.shape[1] // 2
    delta = torch.zeros(gu.shape, dtype=torch.float32, device=gu.device)
    lora_expand_ref(buf, lora_b, ranks, pages, [0, i, 2 * i], meta, delta,
                    b_offsets=b_offsets)  # fmt: skip
    return silu_and_mul_ref(gu, delta, gelu=gelu)


if HAVE_TRITON:
    from loraplex.engine.kernels.lora_expand import _b_tile, _col_offs, _drop, _page_mask
    from loraplex.engine.kernels.silu_and_mul import _act

    @triton.jit
    def _tile_x(x_rows, KSTRIDE, KS, xmask, IEEE: tl.constexpr, DT: tl.constexpr):
        """[BLOCK_M, BLOCK_R] of the shrink's result: the K splits' partials summed."""
        xt = tl.load(x_rows, mask=xmask, other=0.0)
        for ks in range(1, KS):
            xt += tl.load(x_rows + ks * KSTRIDE, mask=xmask, other=0.0)
        if not IEEE:
            xt = xt.to(DT)
        return xt

    @triton.jit
    def _delta(xt, b_ptr, col, offs_n, mask_n, mask_pg, keep_r, stride_bn,
               PR: tl.constexpr, VEC: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """[BLOCK_M, BLOCK_N] float32: ``xt @ B[offs_n, :rank].T``."""
        bt = tl.load(
            _b_tile(b_ptr, col, offs_n, stride_bn, PR, VEC),
            mask=mask_n[:, None] & mask_pg[None, :],
            other=0.0,
        )
        bt = _drop(bt, keep_r)
        if IEEE:
            return tl.dot(xt, tl.trans(bt), input_precision="ieee")
        return tl.dot(xt, tl.trans(bt))

    @triton.jit(do_not_specialize=["T", "KS", "NT", "BOFF0", "BOFF1"])
    def _lora_silu_and_mul_kernel(
        gu_ptr,  # [T, 2I]
        buf_ptr,  # [KS, 2, T, R] float32 partial sums
        b_ptr,  # [U, 2I, PR] (pages)
        ranks_ptr,  # [slots, 2]
        pages_ptr,  # [slots, 2, MAXP] int32
        out_ptr,  # [T, I]
        sorted_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_end_ptr,
        token_slot_ptr,
        NT,
        T,
        R,
        MAXP,
        INNER,
        BOFF0,
        BOFF1,
        KS,
        N_PER_PROG,  # activation columns per program (a multiple of BLOCK_N)
        stride_bs,
        stride_bn,
        stride_gu,
        stride_o,
        PR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr,
        GELU: tl.constexpr,
        VEC: tl.constexpr,
    ):
        tile = tl.program_id(0)
        n_start = tl.program_id(1) * N_PER_PROG
        n_end = tl.minimum(n_start + N_PER_PROG, INNER)
        if tile >= NT:  # rows without an adapter (and a graph's padding rows): no delta
            offs_t = (tile - NT) * BLOCK_M + tl.arange(0, BLOCK_M)
            ts = tl.load(token_slot_ptr + offs_t, mask=offs_t < T, other=0)
            rows = offs_t.to(tl.int64)
            mask_m = (offs_t < T) & (ts < 0)
            g_rows = gu_ptr + rows[:, None] * stride_gu
            o_rows = out_ptr + rows[:, None] * stride_o
            for n0 in range(n_start, n_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                m = mask_m[:, None] & (offs_n < n_end)[None, :]
                g = tl.load(g_rows + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
                u = tl.load(g_rows + INNER + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
                tl.store(o_rows + offs_n[None, :], _act(g, u, GELU).to(out_ptr.dtype.element_ty),
                         mask=m)  # fmt: skip
            return
        slot = tl.load(tile_slot_ptr + tile)  # the three loads of one round trip
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        if slot < 0:
            return
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tok = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        rank_g = tl.minimum(tl.load(ranks_ptr + slot * 2), R)  # at most the partials' width
        rank_u = tl.minimum(tl.load(ranks_ptr + slot * 2 + 1), R)
        x_rows = buf_ptr + tok[:, None] * R  # [BLOCK_M, 1]: projection 0's, split 0's
        page_row = pages_ptr + slot * 2 * MAXP
        g_rows = gu_ptr + tok[:, None] * stride_gu
        o_rows = out_ptr + tok[:, None] * stride_o
        # a tile takes its ranks' bucket (<= 16, <= 32, else the partials' width): in a
        # rank-64 pool a rank-16 tile's dots and B loads are a quarter as wide
        r_max = tl.maximum(rank_g, rank_u)
        if BLOCK_R > 16 and r_max <= 16:
            _tile_rows(x_rows, T, R, KS, mask_m, rank_g, rank_u, page_row, MAXP, g_rows, o_rows,
                       b_ptr, BOFF0, BOFF1, INNER, n_start, n_end, stride_bs, stride_bn,
                       PR, 16, BLOCK_N, IEEE, GELU, VEC)  # fmt: skip
        elif BLOCK_R > 32 and r_max <= 32:
            _tile_rows(x_rows, T, R, KS, mask_m, rank_g, rank_u, page_row, MAXP, g_rows, o_rows,
                       b_ptr, BOFF0, BOFF1, INNER, n_start, n_end, stride_bs, stride_bn,
                       PR, 32, BLOCK_N, IEEE, GELU, VEC)  # fmt: skip
        else:
            _tile_rows(x_rows, T, R, KS, mask_m, rank_g, rank_u, page_row, MAXP, g_rows, o_rows,
                       b_ptr, BOFF0, BOFF1, INNER, n_start, n_end, stride_bs, stride_bn,
                       PR, BLOCK_R, BLOCK_N, IEEE, GELU, VEC)  # fmt: skip

    @triton.jit
    def _tile_rows(
        x_rows, T, R, KS, mask_m, rank_g, rank_u, page_row, MAXP, g_rows, o_rows, b_ptr, BOFF0,
        BOFF1, INNER, n_start, n_end, stride_bs, stride_bn, PR: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, GELU: tl.constexpr,
        VEC: tl.constexpr,
    ):  # fmt: skip
        """One tile of one adapter's tokens over columns ``[n_start, n_end)``, the ranks in
        one ``BLOCK_R``-wide step (the caller picked a bucket that holds both)."""
        offs_r = tl.arange(0, BLOCK_R)
        keep_g, keep_u = offs_r < rank_g, offs_r < rank_u
        KSTRIDE = 2 * T * R  # one K split's partials further
        xr = x_rows + offs_r[None, :]
        dt = b_ptr.dtype.element_ty
        xg = _tile_x(xr, KSTRIDE, KS, mask_m[:, None] & keep_g[None, :], IEEE, dt)
        xu = _tile_x(xr + T * R, KSTRIDE, KS, mask_m[:, None] & keep_u[None, :], IEEE, dt)
        pg_g, pg_u = _page_mask(offs_r, rank_g, PR), _page_mask(offs_r, rank_u, PR)
        col_g = BOFF0 + _col_offs(page_row, offs_r, pg_g, stride_bs, PR)
        col_u = BOFF1 + _col_offs(page_row + MAXP, offs_r, pg_u, stride_bs, PR)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_end
            m = mask_m[:, None] & mask_n[None, :]
            g = tl.load(g_rows + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
            u = tl.load(g_rows + INNER + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
            g += _delta(xg, b_ptr, col_g, offs_n, mask_n, pg_g, keep_g, stride_bn, PR, VEC, IEEE)
            u += _delta(xu, b_ptr, col_u, offs_n + INNER, mask_n, pg_u, keep_u, stride_bn, PR, VEC,
                        IEEE)  # fmt: skip
            tl.store(o_rows + offs_n[None, :], _act(g, u, GELU).to(o_rows.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=1024)  # host ints only
def _config(T: int, block_m: int, inner: int, on_gpu: bool, sms: int) -> tuple[int, int]:
    """(BLOCK_N, N_PER_PROG): a few waves of programs over the step's real tiles."""
    if not on_gpu:  # interpreter: small blocks so that tests walk several N steps
        return 32, 64
    block_n = 128
    n_blocks = cdiv(inner, block_n)
    units = cdiv(T, block_m)
    split = max(1, min(n_blocks, cdiv(8 * sms, units)))
    return block_n, cdiv(n_blocks, split) * block_n


def lora_silu_and_mul(
    gu: torch.Tensor,
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: torch.Tensor,
    pages: torch.Tensor,
    meta: LoraMeta,
    gelu: bool = False,
    b_offsets: Sequence[int] | None = None,
    config: dict | None = None,  # launch override: block_n, n_per, num_warps, num_stages
) -> torch.Tensor:
    T, I2 = gu.shape
    KS, P, T2, R = buf.shape
    _, N, PR = lora_b.shape
    S_, P2, maxp = pages.shape
    if gu.dim() != 2 or I2 % 2 or gu.stride(1) != 1 or N != I2 or gu.dtype != lora_b.dtype:
        raise ValueError("gu must be [T, 2I] (contiguous rows) with lora_b's N and dtype")
    if P != 2 or P2 != 2 or T2 != T or buf.dtype != torch.float32 or not buf.is_contiguous():
        raise ValueError("buf must be contiguous float32 [KS, 2, T, R] (the gate/up group)")
    if R > maxp * PR:
        raise ValueError(f"partials width {R} > the pool's rank {maxp * PR}")
    if pages.dtype != torch.int32 or not pages.is_contiguous() or PR & (PR - 1):
        raise ValueError("pages: contiguous int32 [slots, 2, MAXP]; PAGE_ROWS a power of 2")
    if ranks.shape != (S_, 2) or ranks.dtype != torch.int32 or lora_b.stride(2) != 1:
        raise ValueError("ranks must be int32 [slots, 2] with pages' slots")
    if meta.token_slot.shape[0] != T:
        raise ValueError("meta built for a different number of tokens")
    inner = I2 // 2
    out = torch.empty(T, inner, dtype=gu.dtype, device=gu.device)
    if T == 0:
        return out
    boffs = [int(o) for o in b_offsets] if b_offsets is not None else [0, 0]
    if len(boffs) != 2:
        raise ValueError(f"b_offsets {boffs} must have one offset per projection (2)")
    sms = num_sms(gu.device) if gu.is_cuda else 132
    block_n, n_per = _config(T, meta.block_m, inner, gu.is_cuda, sms)
    # 2 stages: in a rank-64 pool 0.83x the unfused ops against 1.06x with 3 at 8,192 tokens
    # (H100, bench_lora_act.py --mixed), the same at rank 16
    cfg = {"num_warps": 4, "num_stages": 2}
    if config:
        block_n, n_per = config.get("block_n", block_n), config.get("n_per", n_per)
        cfg.update({k: v for k, v in config.items() if k in cfg})
    if n_per % block_n:
        raise ValueError(f"n_per {n_per} must be whole blocks of {block_n}")
    strides = (lora_b.stride(0), lora_b.stride(1))
    vec = all(v % PR == 0 for v in (*boffs, *strides, lora_b.storage_offset()))
    nt = meta.tile_seg.shape[0]
    _lora_silu_and_mul_kernel[(nt + cdiv(T, meta.block_m), cdiv(inner, n_per))](
        gu, buf, lora_b, ranks.contiguous(), pages, out,
        meta.sorted_tokens, meta.tile_slot, meta.tile_start, meta.tile_end, meta.token_slot,
        nt, T, R, maxp, inner, boffs[0], boffs[1], KS, n_per, *strides,
        gu.stride(0), out.stride(0),
        PR=PR, BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=max(16, next_pow2(R)),
        IEEE=gu.dtype == torch.float32, GELU=gelu, VEC=vec, **cfg,
    )  # fmt: skip
    return out
