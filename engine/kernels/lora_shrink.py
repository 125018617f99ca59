"""SGMV shrink: ``buf[p, t, :r] = x[t] @ lora_a[slot(t), p, :r].T`` for every projection p.

A slot's rows are paged (``engine/lora/pool.py``): row ``r`` of projection ``p`` is
``lora_a[pages[slot, p, r // PR], p, r % PR]``, one page-table read per rank tile.

The result comes as K-split partial sums ``buf[KS, P, T, R]`` float32 (the shrink is
``buf.sum(0)``): each split writes its own slice, so there is no zero-fill and no atomics;
``lora_expand`` adds the partials when it loads them. Only entries that the expand reads
(tokens with an adapter, ``r < ranks[slot, p]``) are written; the rest is undefined.

``R`` is the pool's max rank, except on the segment path given ``max_rank`` (the largest rank
of the step's adapters, a host int): there it is :func:`seg_rank` of it, so a pool of rank 64
serving rank-16 adapters sizes its partials, tiles and the expand's reduction for 16. The
segment kernels also take each tile's rank bucket (<= 16, <= 32, else the full tile) when the
batch mixes ranks, as the per-token path does.

Two kernels, picked on the host from ``T`` and ``meta.num_segments`` (:func:`use_token_path`):
the per-token path (decode: one program per token, projection and K slice, the token's slot
read from ``meta.token_slot``; grid ``(T, P, KS)``) and the segment path (prefill: one program
per tile of one adapter's tokens, tensor-core dots; grid ``(NT, P, KS)``). Both grids depend on
``T`` and the meta's static shapes only, so either is CUDA-graph safe.
"""

from __future__ import annotations

import functools

import torch

from loraplex.engine.kernels._triton import (
    HAVE_TRITON,
    cdiv,
    gdc_launch_dependents,
    gdc_wait,
    next_pow2,
    num_sms,
    pdl_ok,
    prefetch_l2,
    tl,
    tokens_at_132_sms,
    triton,
)
from loraplex.engine.kernels.lora_meta import LoraMeta


def segment_ranks(ranks: torch.Tensor, seg_slot: list[int]) -> dict[int, list[int]]:
    """Each segment slot's row of the rank table, as host ints: only those rows (the table
    has a row for every slot of the pool, ~1,700 in a CPU server's default pool, and the
    reference ops run per layer and group)."""
    live = sorted({s for s in seg_slot if s >= 0})
    if not live:
        return {}
    rows = ranks[torch.tensor(live, device=ranks.device)].tolist()
    return dict(zip(live, rows, strict=True))


SEG_RANK_TILE = 16  # the segment path's partials width is a multiple of this (tl.dot's least)


def seg_rank(max_rank: int | None, pool_rank: int) -> int:
    """The width of the segment path's partials: ``max_rank`` (the largest rank among the
    step's adapters, host-known) rounded up to :data:`SEG_RANK_TILE`, at most the pool's rank;
    the pool's rank when ``max_rank`` is None."""
    if max_rank is None:
        return pool_rank
    if max_rank < 0:
        raise ValueError(f"max_rank {max_rank} < 0")
    tiles = max(1, -(-max_rank // SEG_RANK_TILE))
    return min(pool_rank, tiles * SEG_RANK_TILE)


def lora_shrink_ref(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [U, P, PAGE_ROWS, in] (the pool's strided view)
    ranks: torch.Tensor,  # [slots, P] int32
    pages: torch.Tensor,  # [slots, P, MAXP] int32: each projection's pages in rank order
    meta: LoraMeta,
    max_rank: int | None = None,  # the step's largest adapter rank (see lora_shrink)
    row_div: int = 1,  # token t reads x[t // row_div] (lora_shrink's)
) -> torch.Tensor:  # [1, P, T, R] float32, R = seg_rank(max_rank, MAXP * PAGE_ROWS)
    if row_div > 1:
        x = x.repeat_interleave(row_div, dim=0)
    T = x.shape[0]
    _, P, PR, _ = lora_a.shape
    R = seg_rank(max_rank, pages.shape[2] * PR)
    buf = torch.zeros(1, P, T, R, dtype=torch.float32, device=x.device)
    seg_start = meta.seg_start.tolist()
    seg_slot = meta.seg_slot.tolist()
    ranks_h = segment_ranks(ranks, seg_slot)
    for s in range(len(seg_slot)):
        slot, a, b = seg_slot[s], seg_start[s], seg_start[s + 1]
        if slot < 0 or b <= a:
            continue
        toks = meta.sorted_tokens[a:b].long()
        xs = x[toks].float()
        for p in range(P):
            r = ranks_h[slot][p]
            if r:  # the slot's pages of projection p, PR rank rows each, in rank order
                rows = lora_a[pages[slot, p, : -(-r // PR)].long(), p].flatten(0, 1)[:r]
                buf[0, p, toks, :r] = xs @ rows.float().T
    return buf


if HAVE_TRITON:

    @triton.jit
    def _row_ptrs(a_base, page_row, offs_r, mask_r, stride_as, stride_ar, PR: tl.constexpr):
        """[BLOCK_R] pointers to rank rows ``offs_r`` of one slot and projection: each row's
        page from the slot's row of the page table (``a_base``: the projection's offset)."""
        pg = tl.load(page_row + offs_r // PR, mask=mask_r, other=0)
        return a_base + pg.to(tl.int64) * stride_as + (offs_r % PR) * stride_ar

    @triton.jit
    def _prefetch_a(
        a_base, page_row, rank, stride_as, stride_ar, k_lo, k_hi, LINE: tl.constexpr,
        PR: tl.constexpr,
    ):  # fmt: skip
        """This program's A rows ``[:rank, k_lo:k_hi]`` into L2 (before gdc_wait)."""
        n_lines = tl.cdiv(k_hi - k_lo, LINE)
        for i0 in range(0, rank * n_lines, 256):
            idx = i0 + tl.arange(0, 256)
            r_i = idx // n_lines
            live = idx < rank * n_lines
            rows = _row_ptrs(a_base, page_row, r_i, live, stride_as, stride_ar, PR)
            prefetch_l2(rows + k_lo + (idx - r_i * n_lines) * LINE, live)

    @triton.jit
    def _shrink_rows(
        x_row, a_base, page_row, rank, k_lo, k_hi, out, stride_as, stride_ar,
        PR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """One token's ``out[:rank] = A[:rank, k_lo:k_hi] @ x[k_lo:k_hi]`` in [BLOCK_R,
        BLOCK_K] tiles: the rank in BLOCK_R steps, K in BLOCK_K steps."""
        offs_k = tl.arange(0, BLOCK_K)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            a_rows = _row_ptrs(a_base, page_row, offs_r, mask_r, stride_as, stride_ar, PR)[:, None]
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < k_hi
                xv = tl.load(x_row + kk, mask=mask_k, other=0.0)
                at = tl.load(
                    a_rows + kk[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0
                )
                acc += at.to(tl.float32) * xv.to(tl.float32)[None, :]
            tl.store(out + offs_r, tl.sum(acc, axis=1), mask=mask_r)

    @triton.jit
    def _seg_rows(
        x_rows, mask_m, a_base, page_row, rank, k_lo, k_hi, out_rows, stride_as, stride_ar,
        PR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """One tile of tokens: ``out[m, :rank] = A[:rank, k_lo:k_hi] @ x[m, k_lo:k_hi]`` in
        [BLOCK_M, BLOCK_R] tensor-core tiles (``x_rows``, ``out_rows``: [BLOCK_M, 1] row
        pointers), the rank in BLOCK_R steps, K in BLOCK_K steps."""
        offs_k = tl.arange(0, BLOCK_K)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            a_rows = _row_ptrs(a_base, page_row, offs_r, mask_r, stride_as, stride_ar, PR)[:, None]
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < k_hi
                xt = tl.load(
                    x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
                )
                at = tl.load(
                    a_rows + kk[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0
                )
                if IEEE:
                    acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
                else:
                    acc += tl.dot(xt, tl.trans(at))
            tl.store(out_rows + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])

    # the token count is not specialized on (divisible by 16 or not, == 1): one compiled
    # variant serves every step size, so steps of new sizes never wait for the JIT
    @triton.jit(do_not_specialize=["T", "PREFETCH"])
    def _bgmv_shrink_kernel(
        x_ptr,  # [T, K]
        a_ptr,  # [U, P, PR, K] (pages)
        ranks_ptr,  # [slots, P]
        pages_ptr,  # [slots, P, MAXP] int32
        buf_ptr,  # [KS, P, T, R] float32: this split writes buf[ks]
        token_slot_ptr,  # [T] int32, -1 = no adapter
        T,
        K,
        R,
        MAXP,
        P: tl.constexpr,
        stride_xt,
        stride_as,
        stride_ap,
        stride_ar,
        K_PER_SPLIT,
        PR: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH,  # int 0/1, a runtime flag: one compiled variant for every T
        LINE: tl.constexpr,
        EARLY: tl.constexpr,
        ONE_TILE: tl.constexpr,  # K_PER_SPLIT <= BLOCK_K and R <= BLOCK_R: one A tile
        PRELOAD: tl.constexpr,  # ONE_TILE: the A tile loads before gdc_wait
        RANK_SPLIT: tl.constexpr,  # BLOCK_R > 16: ranks <= 16 (and <= 32) take their own tiles
        RANK16_K: tl.constexpr,  # the K step of the rank <= 16 tiles
        RANK32_K: tl.constexpr,
        ROW_DIV: tl.constexpr,  # token t reads x row t // ROW_DIV
    ):
        # per-token path (decode): one program = one token, one projection p, one K slice;
        # multiply-reduce on the CUDA cores. Its cost does not depend on how the tokens group
        # into segments (a second token of the same adapter finds the A slice in L2).
        if USE_PDL and EARLY:
            gdc_launch_dependents()  # the next kernel may start (and load its weights) now
        t = tl.program_id(0)
        p = tl.program_id(1)
        ks = tl.program_id(2)
        slot = tl.load(token_slot_ptr + t)
        if slot < 0:
            return
        rank = tl.load(ranks_ptr + slot * P + p)
        if rank == 0:
            return
        k_lo = ks * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        a_base = a_ptr + p * stride_ap
        page_row = pages_ptr + (slot * P + p) * MAXP
        if ONE_TILE:
            # the program's whole A slice as one [BLOCK_R, BLOCK_K] tile; with PRELOAD it is
            # in flight before gdc_wait (A is never written by the previous kernel), so after
            # the wait only x (L2) is left to fetch
            offs_r = tl.arange(0, BLOCK_R)
            offs_k = k_lo + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            # pages masked by the table's width, not the rank (entries past the adapter's
            # pages hold 0, a valid page): they load beside the rank
            rows = _row_ptrs(a_base, page_row, offs_r, offs_r < R, stride_as, stride_ar, PR)
            a_tile = rows[:, None] + offs_k[None, :]
            a_mask = (offs_r < rank)[:, None] & mask_k[None, :]
            if PRELOAD:
                at = tl.load(a_tile, mask=a_mask, other=0.0)
            if USE_PDL:
                gdc_wait()  # what the previous kernel wrote (x) is visible after this
            x_row = x_ptr + (t // ROW_DIV).to(tl.int64) * stride_xt
            xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0)
            if not PRELOAD:
                at = tl.load(a_tile, mask=a_mask, other=0.0)
            part = tl.sum(at.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
            out = buf_ptr + ((ks * P + p) * T + t).to(tl.int64) * R
            tl.store(out + offs_r, part, mask=offs_r < rank)
            if USE_PDL and not EARLY:
                gdc_launch_dependents()
            return
        if USE_PDL:
            if PREFETCH != 0:
                _prefetch_a(a_base, page_row, rank, stride_as, stride_ar, k_lo, k_hi, LINE, PR)
            gdc_wait()  # what the previous kernel wrote (x) is visible after this
        x_row = x_ptr + (t // ROW_DIV).to(tl.int64) * stride_xt
        out = buf_ptr + ((ks * P + p) * T + t).to(tl.int64) * R
        if RANK_SPLIT:
            # a pool of wide ranks serving mixed ones: each token takes the tiles of its own
            # rank's bucket (a rank-8 token in a [64, 32] tile reads an eighth of what the
            # tile's loop walks); one compiled kernel, the branch per program
            if rank <= 16:
                _shrink_rows(x_row, a_base, page_row, rank, k_lo, k_hi, out, stride_as,
                             stride_ar, PR, 16, RANK16_K)  # fmt: skip
            elif BLOCK_R > 32:
                if rank <= 32:
                    _shrink_rows(x_row, a_base, page_row, rank, k_lo, k_hi, out, stride_as,
                                 stride_ar, PR, 32, RANK32_K)  # fmt: skip
                else:
                    _shrink_rows(x_row, a_base, page_row, rank, k_lo, k_hi, out, stride_as,
                                 stride_ar, PR, BLOCK_R, BLOCK_K)  # fmt: skip
            else:
                _shrink_rows(x_row, a_base, page_row, rank, k_lo, k_hi, out, stride_as,
                             stride_ar, PR, BLOCK_R, BLOCK_K)  # fmt: skip
        else:
            _shrink_rows(x_row, a_base, page_row, rank, k_lo, k_hi, out, stride_as, stride_ar,
                         PR, BLOCK_R, BLOCK_K)  # fmt: skip
        if USE_PDL and not EARLY:
            gdc_launch_dependents()

    @triton.jit(do_not_specialize=["T", "PREFETCH"])
    def _sgmv_shrink_kernel(
        x_ptr,  # [T, K]
        a_ptr,  # [U, P, PR, K] (pages)
        ranks_ptr,  # [slots, P]
        pages_ptr,  # [slots, P, MAXP] int32
        buf_ptr,  # [KS, P, T, R] float32: this split writes buf[ks]; R: seg_rank's width
        sorted_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_end_ptr,
        T,
        K,
        R,
        MAXP,
        P: tl.constexpr,
        stride_xt,
        stride_as,
        stride_ap,
        stride_ar,
        K_PER_SPLIT,
        PR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH,  # int 0/1, a runtime flag: one compiled variant for every T
        LINE: tl.constexpr,
        EARLY: tl.constexpr,
        RANK_SPLIT: tl.constexpr,  # BLOCK_R > 16: tiles of ranks <= 16 (and <= 32) take their own
        ROW_DIV: tl.constexpr,  # token t reads x row t // ROW_DIV
    ):
        # segment path (prefill-like): one program = one tile of <= BLOCK_M tokens of one
        # segment (one adapter), one projection p, one K slice; tensor-core dots.
        if USE_PDL and EARLY:
            gdc_launch_dependents()  # the next kernel may start (and load its weights) now
        tile = tl.program_id(0)
        p = tl.program_id(1)
        ks = tl.program_id(2)
        slot = tl.load(tile_slot_ptr + tile)  # the three loads of one round trip
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        if slot < 0:
            return
        # at most the partials' width: a host bound below a slot's rank truncates that
        # adapter, never writes past its row of buf
        rank = tl.minimum(tl.load(ranks_ptr + slot * P + p), R)
        if rank == 0:
            return
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tok = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        k_lo = ks * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        a_base = a_ptr + p * stride_ap
        page_row = pages_ptr + (slot * P + p) * MAXP
        if USE_PDL:
            if PREFETCH != 0:  # this program's A rows stream into L2 while the previous ends
                _prefetch_a(a_base, page_row, rank, stride_as, stride_ar, k_lo, k_hi, LINE, PR)
            gdc_wait()  # what the previous kernel wrote (x) is visible after this
        x_rows = x_ptr + (tok // ROW_DIV)[:, None] * stride_xt
        out_rows = buf_ptr + (ks * P + p) * T * R + tok[:, None] * R
        if RANK_SPLIT:
            # the batch mixes ranks: a tile takes its own rank's bucket (a rank-8 tile in a
            # [16, 64] dot would do 8x its work); one compiled kernel, the branch per program
            if rank <= 16:
                _seg_rows(x_rows, mask_m, a_base, page_row, rank, k_lo, k_hi, out_rows,
                          stride_as, stride_ar, PR, BLOCK_M, 16, BLOCK_K, IEEE)  # fmt: skip
            elif BLOCK_R > 32:
                if rank <= 32:
                    _seg_rows(x_rows, mask_m, a_base, page_row, rank, k_lo, k_hi, out_rows,
                              stride_as, stride_ar, PR, BLOCK_M, 32, BLOCK_K, IEEE)  # fmt: skip
                else:
                    _seg_rows(x_rows, mask_m, a_base, page_row, rank, k_lo, k_hi, out_rows,
                              stride_as, stride_ar, PR, BLOCK_M, BLOCK_R, BLOCK_K, IEEE)  # fmt: skip
            else:
                _seg_rows(x_rows, mask_m, a_base, page_row, rank, k_lo, k_hi, out_rows,
                          stride_as, stride_ar, PR, BLOCK_M, BLOCK_R, BLOCK_K, IEEE)  # fmt: skip
        else:
            _seg_rows(x_rows, mask_m, a_base, page_row, rank, k_lo, k_hi, out_rows, stride_as,
                      stride_ar, PR, BLOCK_M, BLOCK_R, BLOCK_K, IEEE)  # fmt: skip
        if USE_PDL and not EARLY:
            gdc_launch_dependents()


# Segment path: at most this many K splits. 16, not 8, for the long K of down (14336:
# 1024-wide slices, 14 splits): H100, 32 adapters over 256 tokens on 128 slots, the layer in
# line 91.3 -> 88.4 us, the decode step beside the GEMMs 16.18-16.28 -> 16.12 ms
# (bench_sgmv.py --variants, sweep_decode_lora.py --batch 256; docs/benchmarks.md)
MAX_SPLIT = 16


def use_token_path(T: int, meta: LoraMeta) -> bool:
    """Per-token path or segment path, from host ints only (static for a CUDA graph).

    The segment path (tensor-core tiles of one adapter) pays when segments hold several
    tokens on average: ``T >= 2 * num_segments``. Decode graphs build their meta padded to the
    slot count, so their batches (fewer than 2 tokens per slot) always take the per-token path,
    which costs the same however the tokens group; eager prefill takes the segment path.
    """
    return T < 2 * max(1, meta.num_segments)


@functools.lru_cache(maxsize=4096)  # pure in host ints: once per shape, not per launch
def _shrink_config(
    T: int,
    K: int,
    P: int,
    R: int,
    on_gpu: bool,
    rows: bool,
    block_m: int,
    max_split: int = MAX_SPLIT,
    in_line: bool = True,
    sms: int = 132,
):
    """(BLOCK_R, BLOCK_K, K_PER_PROG, ONE_TILE): split K so that the grid has a few waves of
    programs.

    Sized from ``T`` (known on the host, the graph's batch size), never from the padded tile
    count: the segment path has at least ``cdiv(T, block_m)`` real tiles when every token has
    an adapter. ``in_line``: the kernel runs alone on its stream (early launch), not beside
    another stream's GEMM."""
    block_r = 16 if R <= 16 else 32 if R <= 32 else 64
    if not on_gpu:  # interpreter: small blocks so that tests walk several K and R steps
        block_r = min(block_r, 32)
        if rows:
            return block_r, 32, 256 if K > 512 else 64, False
    if rows:  # decode: short K slices, many programs. Rank 16: 512-wide slices.
        if block_r == 16:
            if in_line:
                # in line: each slice one [16, 512] tile of A, loaded before gdc_wait (H100,
                # Llama-3-8B layer of distinct adapters in a 32-layer graph, 4 warps: 32 / 64 /
                # 128 / 256 tokens 49.5 / 84.4 / 153.1 / 280.3 -> 45.3 / 78.7 / 146.5 / 276.6
                # us; bench_sgmv.py --variants, docs/benchmarks.md)
                return block_r, 512, min(512, cdiv(K, 512) * 512), True
            # beside the GEMMs: 256-wide steps, best in the H100 sweeps of a batch-32 decode
            # step (benchmarks/sweep_decode_lora.py, docs/benchmarks.md)
            return block_r, 256, min(512, cdiv(K, 256) * 256), False
        # BLOCK_K 32 for wide ranks (sm_90 build: r16 x k128 48 registers, r64 x k128 254 and
        # spills, r64 x k32 80). Beside the GEMMs, longer K slices as the batch grows: each
        # slice writes a [T, R] fp32 partial that the expand reads back (at batch 256, 256-wide
        # slices of the down projection's 14,336 are 56 partials, 3.7 MB a layer). H100,
        # decode step in a rank-64 pool with the expand's tile runs (lora_expand.
        # _beside_gemm_tiles): batch 128 13.0 -> 12.8 ms, 256 with 132 adapters 18.1 -> 17.2
        # (sweep_decode_lora.py, docs/benchmarks.md)
        t = 0 if in_line else tokens_at_132_sms(T, sms)
        k_per = 2048 if t >= 128 else 1024 if t >= 64 else 256
        return block_r, 32, min(k_per, cdiv(K, 32) * 32), False
    block_k = (256 if K >= 1024 else 128) if on_gpu else 128 if K >= 128 else 32
    if on_gpu and not in_line and K >= 1024 and R > 16 and tokens_at_132_sms(T, sms) >= 256:
        # the segment path beside the GEMMs at a decode graph of 256 in a pool wider than
        # rank 16: two to seven long K slices, fewer partials for the expand to read
        # (lora_expand._expand_config). Measured at rank 64; in a rank-16 pool the split by
        # waves below is faster (H100, offline throughput with 32 adapters: 14.57 against
        # 14.25 ms of GPU a step; docs/benchmarks.md)
        return block_r, block_k, 2048, False
    want = 8 * sms if on_gpu else 16  # a few waves of programs on this device's SMs
    tiles = cdiv(T, block_m)
    # at most MAX_SPLIT splits (the expand's tensor-core path adds the partials one by one)
    split = max(1, min(cdiv(want, max(1, tiles * P)), cdiv(K, 2 * block_k), max_split))
    k_per = cdiv(cdiv(K, split), block_k) * block_k
    return block_r, block_k, k_per, False


def lora_shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [U, P, PAGE_ROWS, in] (the pool's strided view)
    ranks: torch.Tensor,  # [slots, P] int32
    pages: torch.Tensor,  # [slots, P, MAXP] int32: each projection's pages in rank order
    meta: LoraMeta,
    config: dict | None = None,  # tuning override: block_k, k_per, num_warps, num_stages
    early_launch: bool = True,
    max_rank: int | None = None,  # the step's largest adapter rank (host int); None: the pool's
    row_div: int = 1,
) -> torch.Tensor:  # [KS, P, T, R] float32 partials over K splits
    """``row_div``: ``x`` holds ``T / row_div`` rows and token ``t`` reads row
    ``t // row_div`` (the MoE layer's (token, expert) pairs, ``top_k`` per token row: no
    repeated copy of the rows).

    ``early_launch`` (Hopper PDL): every program lets the next kernel of the stream launch
    as it starts, so that kernel's programs take free SMs during this one's tail (they wait
    in ``gdc_wait`` before reading what this one writes). Off for kernels that run beside
    another stream's GEMM, where the waiting programs take SMs from it (H100: -6 % for the
    layer in line, +4 % for the decode step beside; docs/benchmarks.md).

    ``max_rank``: at least every rank of the slots the meta's tokens use (the host knows
    which adapters a step runs); the segment path then sizes ``R`` by it (:func:`seg_rank`),
    the per-token path keeps the pool's (its shapes stay what a decode graph captured).
    Config ``"r_eff": False`` ignores it and ``"rank_split": False`` takes one tile shape for
    every rank (the behaviour before both; bench_sgmv.py --seg-rank)."""
    T, K = x.shape[0] * row_div, x.shape[1]
    _, P, PR, K2 = lora_a.shape
    S_, P2, maxp = pages.shape
    R = pool_r = maxp * PR
    if K2 != K:
        raise ValueError(f"lora_a in_features {K2} != x {K}")
    if row_div < 1:
        raise ValueError(f"row_div {row_div} < 1")
    if ranks.shape != (S_, P) or ranks.dtype != torch.int32 or P2 != P:
        raise ValueError("ranks must be int32 [slots, P] with pages' slots and projections")
    if pages.dtype != torch.int32 or not pages.is_contiguous() or PR & (PR - 1):
        raise ValueError("pages: contiguous int32 [slots, P, MAXP]; PAGE_ROWS a power of 2")
    if x.dtype != lora_a.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, lora_a {lora_a.dtype}")
    if meta.token_slot.shape[0] != T:
        raise ValueError("meta built for a different number of tokens")
    if x.stride(1) != 1 or lora_a.stride(3) != 1:
        raise ValueError("x and lora_a need a contiguous last dimension")
    ranks = ranks.contiguous()
    rows = use_token_path(T, meta)
    if config:
        rows = config.get("rows", rows)
    if not rows and (not config or config.get("r_eff", True)):
        R = seg_rank(max_rank, pool_r)
    nt = meta.tile_seg.shape[0]
    if T == 0 or nt == 0 or meta.num_segments == 0:
        return torch.zeros(1, P, T, R, dtype=torch.float32, device=x.device)
    max_split = config.get("max_split", MAX_SPLIT) if config else MAX_SPLIT
    if config:
        early_launch = config.get("early", early_launch)
    block_r, block_k, k_per, one_tile = _shrink_config(
        T, K, P, R, x.is_cuda, rows, meta.block_m, max_split, early_launch,
        num_sms(x.device) if x.is_cuda else 132,
    )  # fmt: skip
    pdl = pdl_ok(x)
    # L2 prefetch of A before gdc_wait pays for small batches only (the one-tile kernel loads
    # its A tile into registers there instead)
    prefetch = pdl and T <= 16
    cfg = {"num_warps": 4, "num_stages": 2, "launch_pdl": pdl}
    preload = True
    if config:
        block_k, k_per = config.get("block_k", block_k), config.get("k_per", k_per)
        cfg.update({k: v for k, v in config.items() if k in cfg})
        pdl = cfg["launch_pdl"]
        prefetch = config.get("prefetch", prefetch)
        one_tile, preload = config.get("one_tile", one_tile), config.get("preload", preload)
    k_per = min(k_per, cdiv(K, block_k) * block_k)
    one_tile = one_tile and rows and k_per <= block_k and R <= block_r
    # ranks wider than 16 (the pool's on the per-token path, the step's on the segment
    # path): rank-bucketed tiles (see the kernels)
    rank_split = not one_tile and block_r > 16
    if config:
        rank_split = rank_split and config.get("rank_split", True)
    kp2 = next_pow2(k_per)
    rank16_k = min(256, kp2) if x.is_cuda else min(32, kp2)
    rank32_k = min(128, kp2) if x.is_cuda else min(32, kp2)
    split = cdiv(K, k_per)
    buf = torch.empty(split, P, T, R, dtype=torch.float32, device=x.device)
    strides = (x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
    line = 128 // x.element_size()
    if rows:  # grid (T, P, K splits): static for a given T
        _bgmv_shrink_kernel[(T, P, split)](
            x,
            lora_a,
            ranks,
            pages,
            buf,
            meta.token_slot,
            T,
            K,
            R,
            maxp,
            P,
            *strides,
            k_per,
            PR=PR,
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            USE_PDL=pdl,
            PREFETCH=int(prefetch),
            LINE=line,
            EARLY=early_launch,
            ONE_TILE=one_tile,
            PRELOAD=one_tile and preload and pdl,
            RANK_SPLIT=rank_split,
            RANK16_K=rank16_k,
            RANK32_K=rank32_k,
            ROW_DIV=row_div,
            **cfg,
        )
        return buf
    _sgmv_shrink_kernel[(nt, P, split)](
        x,
        lora_a,
        ranks,
        pages,
        buf,
        meta.sorted_tokens,
        meta.tile_slot,
        meta.tile_start,
        meta.tile_end,
        T,
        K,
        R,
        maxp,
        P,
        *strides,
        k_per,
        PR=PR,
        BLOCK_M=meta.block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
        USE_PDL=pdl,
        PREFETCH=int(prefetch),
        LINE=line,
        EARLY=early_launch,
        RANK_SPLIT=rank_split,
        ROW_DIV=row_div,
        **cfg,
    )
    return buf
