"""SGMV expand: ``y[t, off_p:off_p+1] += buf[p, t, :r] @ lora_b[slot(t), off_p:off_p+1, :r].T``.

B is paged like the shrink's A (``engine/lora/pool.py``): column ``r`` of projection ``p``
is ``lora_b[pages[slot, p, r // PR], :, r % PR]``, shifted by ``b_offsets[p]`` elements.

``accumulate=False`` stores the LoRA delta instead (``y = delta``, zero in the rows of tokens
with no adapter and the columns of projections an adapter does not touch): the decode forward
computes the delta on a side stream while the base GEMM writes its own output, and adds the
two afterwards (``LlamaModel.forward``).

``buf``'s width ``R`` is the shrink's: the pool's max rank, or on the segment path the step's
largest rank rounded to a tile (``lora_shrink.seg_rank``); the expand reads and reduces over
that width, with the shrink's rank buckets when the batch mixes ranks.

Two kernels, picked on the host like the shrink's (``use_token_path``): per token (decode;
grid ``(T, N ranges, P)``, slot from ``meta.token_slot``) or per tile of one segment
(prefill; grid ``(NT, N ranges, P)``, tensor-core dots). Both grids are static for a given T.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from loraplex.engine.kernels._triton import (
    HAVE_TRITON,
    cdiv,
    gdc_launch_dependents,
    gdc_wait,
    num_sms,
    pdl_ok,
    prefetch_l2,
    tl,
    tokens_at_132_sms,
    triton,
)
from loraplex.engine.kernels.lora_meta import LoraMeta
from loraplex.engine.kernels.lora_shrink import segment_ranks, use_token_path


def lora_expand_ref(
    buf: torch.Tensor,  # [KS, P, T, R] float32 partials (lora_shrink's), summed here
    lora_b: torch.Tensor,  # [U, N, PAGE_ROWS] (the pool's strided view; scale folded in)
    ranks: torch.Tensor,  # [slots, P] int32
    pages: torch.Tensor,  # [slots, P, MAXP] int32: each projection's pages in rank order
    out_offsets: Sequence[int],  # [P+1] host ints into N
    meta: LoraMeta,
    y: torch.Tensor,  # [T, N], updated in place
    accumulate: bool = True,  # False: y = the delta (zeros where no adapter applies)
    b_offsets: Sequence[int] | None = None,  # [P] element offsets of each projection's B
) -> torch.Tensor:
    if not accumulate:
        y.zero_()
    buf = buf.sum(0)
    P, PR = buf.shape[0], lora_b.shape[2]
    boffs = list(b_offsets) if b_offsets is not None else [0] * P
    # B through its storage (b_offsets may point before the view's first element)
    flat = lora_b.as_strided((lora_b.untyped_storage().nbytes() // lora_b.element_size(),), (1,), 0)
    s0, s1, s2 = lora_b.stride()
    seg_start = meta.seg_start.tolist()
    seg_slot = meta.seg_slot.tolist()
    ranks_h = segment_ranks(ranks, seg_slot)
    for s in range(len(seg_slot)):
        slot, a, b = seg_slot[s], seg_start[s], seg_start[s + 1]
        if slot < 0 or b <= a:
            continue
        toks = meta.sorted_tokens[a:b].long()
        for p in range(P):
            r = ranks_h[slot][p]
            if r:
                n0, n1 = out_offsets[p], out_offsets[p + 1]
                base = lora_b.storage_offset() + boffs[p] + n0 * s1
                cols = torch.cat(  # [n, r]: each page's [n, PR] block, shifted by b_offsets[p]
                    [
                        flat.as_strided((n1 - n0, PR), (s1, s2), base + g * s0)
                        for g in pages[slot, p, : -(-r // PR)].tolist()
                    ],
                    1,
                )[:, :r]
                d = buf[p, toks, :r] @ cols.float().T
                y[toks, n0:n1] = (y[toks, n0:n1].float() + d).to(y.dtype)
    return y


if HAVE_TRITON:

    @triton.jit
    def _proj_cols(p, OFF1, OFF2, OFF3, OFF4):
        """[n_lo, n_hi): the output columns of projection p (P <= 4)."""
        n_lo = tl.where(p == 0, 0, tl.where(p == 1, OFF1, tl.where(p == 2, OFF2, OFF3)))
        n_hi = tl.where(p == 0, OFF1, tl.where(p == 1, OFF2, tl.where(p == 2, OFF3, OFF4)))
        return n_lo, n_hi

    @triton.jit
    def _pick4(p, v0, v1, v2, v3):
        return tl.where(p == 0, v0, tl.where(p == 1, v1, tl.where(p == 2, v2, v3)))

    @triton.jit
    def _col_offs(page_row, offs_r, mask_r, stride_bs, PR: tl.constexpr):
        """[BLOCK_R] offsets of rank columns ``offs_r`` of one slot's B: each column's page
        from the slot's row of the page table, then the column within the page."""
        pg = tl.load(page_row + offs_r // PR, mask=mask_r, other=0)
        return pg.to(tl.int64) * stride_bs + offs_r % PR

    @triton.jit
    def _b_tile(b_ptr, col, offs_n, stride_bn, PR: tl.constexpr, VEC: tl.constexpr):
        """[len(offs_n), len(col)] pointers into B: rank columns at element offsets ``col``
        (:func:`_col_offs` plus the projection's offset), output columns ``offs_n``. ``VEC``:
        the host checked that the projection's offset, the page stride and ``stride_bn`` are
        multiples of ``PR``, so each page's ``PR`` columns of an output row are one aligned
        vector; the hints say so (the page gather hides it from the compiler, which would
        load B one element at a time)."""
        offs = col[None, :] + offs_n[:, None].to(tl.int64) * stride_bn
        if VEC:
            offs = tl.max_contiguous(tl.multiple_of(offs, [PR, PR]), [1, PR])
        return b_ptr + offs

    @triton.jit
    def _page_mask(offs_r, lim, PR: tl.constexpr):
        """Rank columns ``offs_r`` in the pages that hold columns ``< lim``: whole pages, so
        that the mask does not split a vector. Columns past ``lim`` in the last page are
        read; callers drop them (:func:`_drop`)."""
        return offs_r // PR < (lim + PR - 1) // PR  # (the compiler sees PR-wide runs)

    @triton.jit
    def _drop(bt, keep):
        """B's columns past the rank to zero (a page's rows past an adapter's rank may hold
        anything, NaN included, and 0 * NaN is NaN)."""
        return tl.where(keep[None, :], bt, 0.0)

    @triton.jit
    def _zero_rows(y_ptr, rows, mask_rows, stride_yt, n_start, n_end, BLOCK_N: tl.constexpr):
        """y[rows[mask_rows], n_start:n_end] = 0."""
        y_rows = y_ptr + rows[:, None] * stride_yt
        zero = tl.zeros((rows.shape[0], BLOCK_N), dtype=y_ptr.dtype.element_ty)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            tl.store(
                y_rows + offs_n[None, :], zero, mask=mask_rows[:, None] & (offs_n < n_end)[None, :]
            )

    @triton.jit
    def _seg_expand_rows(
        x_rows, KSTRIDE, KS, mask_m, y_rows, b_ptr, boff, page_row, rank, n_start, n_end,
        stride_bs, stride_bn, PR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr, ACCUMULATE: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        """One tile of tokens: ``y[m, n_start:n_end] += sum_ks buf[ks, m, :rank] @ B[:rank]``
        (``x_rows``: [BLOCK_M, 1] pointers to split 0's partials, ``KSTRIDE`` elements to the
        next split's; ``y_rows``: [BLOCK_M, 1]). The rank is walked in BLOCK_R steps (one
        step for every rank <= BLOCK_R); y is read-modified-written once per step, the N loop
        inside so that it is pipelined. Store mode: the first rank step writes y unread."""
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            xmask = mask_m[:, None] & mask_r[None, :]
            xrows = x_rows + offs_r[None, :]
            xt = tl.load(xrows, mask=xmask, other=0.0)
            for ks in range(1, KS):
                xt += tl.load(xrows + ks * KSTRIDE, mask=xmask, other=0.0)
            if not IEEE:
                xt = xt.to(b_ptr.dtype.element_ty)
            mask_pg = _page_mask(offs_r, rank, PR)
            col = boff + _col_offs(page_row, offs_r, mask_pg, stride_bs, PR)
            for n0 in range(n_start, n_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < n_end
                bt = tl.load(
                    _b_tile(b_ptr, col, offs_n, stride_bn, PR, VEC),
                    mask=mask_n[:, None] & mask_pg[None, :],
                    other=0.0,
                )
                bt = _drop(bt, mask_r)
                ymask = mask_m[:, None] & mask_n[None, :]
                if IEEE:
                    acc = tl.dot(xt, tl.trans(bt), input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(bt))
                if ACCUMULATE or r0 > 0:  # store mode: the first rank step writes
                    acc += tl.load(y_rows + offs_n[None, :], mask=ymask, other=0.0).to(tl.float32)
                tl.store(y_rows + offs_n[None, :], acc.to(y_rows.dtype.element_ty), mask=ymask)

    # not specialized on the token count, the K splits or the tile count (lora_shrink's note)
    @triton.jit(do_not_specialize=["T", "KS", "BOFF0", "BOFF1", "BOFF2", "BOFF3"])
    def _bgmv_expand_kernel(
        buf_ptr,  # [KS, P, T, R] float32 partial sums
        b_ptr,  # [U, N, PR] (pages)
        ranks_ptr,  # [slots, P]
        pages_ptr,  # [slots, P, MAXP] int32
        y_ptr,  # [T, N]
        token_slot_ptr,  # [T] int32, -1 = no adapter
        T,
        R,
        MAXP,
        OFF1,
        OFF2,
        OFF3,
        OFF4,
        BOFF0,  # element offset of each projection's B (the pool's per-projection pages)
        BOFF1,
        BOFF2,
        BOFF3,
        KS,
        N_PER_PROG,  # columns of one projection per program (a multiple of BLOCK_N)
        P: tl.constexpr,
        stride_bs,
        stride_bn,
        stride_yt,
        PR: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_KS: tl.constexpr,
        USE_PDL: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        EARLY: tl.constexpr,
        ONE_TILE: tl.constexpr,  # N_PER_PROG == N_TILES * BLOCK_N (ranks past BLOCK_R: a tail)
        N_TILES: tl.constexpr,  # ONE_TILE: the program's B tiles (unrolled, one ahead)
        PRELOAD: tl.constexpr,  # ONE_TILE: load the first B tile before gdc_wait
        VEC: tl.constexpr,  # B's pages aligned to PR columns (_b_tile)
    ):
        # per-token path (decode): one program = one token, a range of N_PER_PROG columns of
        # projection p; multiply-reduce on the CUDA cores. Its cost does not depend on how the
        # tokens group into segments (tokens of one adapter find its B rows in L2).
        if USE_PDL and EARLY:
            gdc_launch_dependents()  # the next kernel may start (and load its weights) now
        t = tl.program_id(0)
        ns = tl.program_id(1)
        p = tl.program_id(2)
        n_lo, n_hi = _proj_cols(p, OFF1, OFF2, OFF3, OFF4)
        n_start = n_lo + ns * N_PER_PROG
        if n_start >= n_hi:
            return
        n_end = tl.minimum(n_start + N_PER_PROG, n_hi)
        t64 = t.to(tl.int64)
        y_row = y_ptr + t64 * stride_yt
        slot = tl.load(token_slot_ptr + t)
        rank = tl.load(ranks_ptr + tl.maximum(slot, 0) * P + p)
        if ONE_TILE:
            # every load issued before the first wait on one: two dependent round trips (the
            # slot, then the rank with the partial sums and y) ahead of the first B tile,
            # where the general loop below runs four (slot, rank, partials, B then y); each
            # later tile's B (and y) loads are issued before the tile ahead of it is reduced
            has = slot >= 0
            offs_n = n_start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_end
            offs_r = tl.arange(0, BLOCK_R)
            # the slot's pages load beside its rank (masked by the table's width, not the
            # rank: entries past the adapter's pages hold 0, a valid page)
            page_row = pages_ptr + (tl.maximum(slot, 0) * P + p) * MAXP
            col = _pick4(p, BOFF0, BOFF1, BOFF2, BOFF3) + _col_offs(
                page_row, offs_r, offs_r < R, stride_bs, PR
            )
            if PRELOAD:  # B is never written by the previous kernel: no need to wait for it
                eff = tl.where(has, rank, 0)
                bt = tl.load(
                    _b_tile(b_ptr, col, offs_n, stride_bn, PR, VEC),
                    mask=mask_n[:, None] & _page_mask(offs_r, eff, PR)[None, :],
                    other=0.0,
                )
            if USE_PDL:
                gdc_wait()  # what the shrink wrote (buf) and y are visible after this
            if ACCUMULATE:
                yv = tl.load(y_row + offs_n, mask=mask_n & has, other=0.0)
            # the partial sums of all R columns (those past the rank are undefined, dropped
            # below): not masked by the rank, so they are in flight while it arrives
            xr_base = buf_ptr + (p * T + t64) * R
            xr = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for ks0 in range(0, KS, BLOCK_KS):
                offs_ks = ks0 + tl.arange(0, BLOCK_KS)
                part = tl.load(
                    xr_base + offs_ks[:, None] * (P * T * R) + offs_r[None, :],
                    mask=(offs_ks[:, None] < KS) & (offs_r < R)[None, :] & has,
                    other=0.0,
                )
                xr += tl.sum(part, axis=0)
            eff = tl.where(has, rank, 0)  # only here: a use before the loads above would wait
            mask_b = _page_mask(offs_r, eff, PR)[None, :]
            if not PRELOAD:
                bt = tl.load(
                    _b_tile(b_ptr, col, offs_n, stride_bn, PR, VEC),
                    mask=mask_n[:, None] & mask_b,
                    other=0.0,
                )
            # xr is zero past the rank, but B there may be NaN: dropped in the reduction
            keep_r = offs_r < eff
            xr = tl.where(keep_r, xr, 0.0)
            for i in tl.static_range(N_TILES):
                if i + 1 < N_TILES:  # the next tile in flight while this one is reduced
                    nn = offs_n + BLOCK_N
                    mnn = nn < n_end
                    bt_next = tl.load(
                        _b_tile(b_ptr, col, nn, stride_bn, PR, VEC),
                        mask=mnn[:, None] & mask_b,
                        other=0.0,
                    )
                    if ACCUMULATE:
                        yv_next = tl.load(y_row + nn, mask=mnn & has, other=0.0)
                acc = tl.sum(_drop(bt, keep_r).to(tl.float32) * xr[None, :], axis=1)
                if ACCUMULATE:
                    # a token with no adapter (or rank 0 here) keeps its row untouched
                    acc += yv.to(tl.float32)
                    tl.store(
                        y_row + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n & (eff > 0)
                    )
                else:  # the delta: zero where no adapter applies
                    tl.store(y_row + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
                if i + 1 < N_TILES:
                    offs_n, mask_n, bt = nn, mnn, bt_next
                    if ACCUMULATE:
                        yv = yv_next
            if eff <= BLOCK_R:
                return
            r_first = BLOCK_R  # a pool wider than BLOCK_R: the rank's other columns below
        else:
            r_first = 0
        if (slot < 0) | (rank == 0):
            if not ACCUMULATE:  # the delta of this token and projection is zero
                if USE_PDL:
                    gdc_wait()  # y's earlier readers are done
                for n0 in range(n_start, n_end, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    zero = tl.zeros((BLOCK_N,), dtype=y_ptr.dtype.element_ty)
                    tl.store(y_row + offs_n, zero, mask=offs_n < n_end)
            return
        page_row = pages_ptr + (slot * P + p) * MAXP
        boff = _pick4(p, BOFF0, BOFF1, BOFF2, BOFF3)
        if USE_PDL:
            gdc_wait()  # what the shrink wrote (buf) and y are visible after this
        xr_base = buf_ptr + (p * T + t64) * R
        # the rank in BLOCK_R steps (one step for every rank <= BLOCK_R); y is
        # read-modified-written once per step
        for r0 in range(r_first, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            xr = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for ks0 in range(0, KS, BLOCK_KS):  # K-split partials, BLOCK_KS loads in flight
                offs_ks = ks0 + tl.arange(0, BLOCK_KS)
                part = tl.load(
                    xr_base + offs_ks[:, None] * (P * T * R) + offs_r[None, :],
                    mask=(offs_ks[:, None] < KS) & mask_r[None, :],
                    other=0.0,
                )
                xr += tl.sum(part, axis=0)
            mask_pg = _page_mask(offs_r, rank, PR)
            col = boff + _col_offs(page_row, offs_r, mask_pg, stride_bs, PR)
            for n0 in range(n_start, n_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < n_end
                bt = tl.load(
                    _b_tile(b_ptr, col, offs_n, stride_bn, PR, VEC),
                    mask=mask_n[:, None] & mask_pg[None, :],
                    other=0.0,
                )
                bt = _drop(bt, mask_r)
                acc = tl.sum(bt.to(tl.float32) * xr[None, :], axis=1)
                if ACCUMULATE:
                    acc += tl.load(y_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                elif r0 > 0:  # store mode: the first rank step writes, later ones add
                    acc += tl.load(y_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                tl.store(y_row + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit(do_not_specialize=["T", "KS", "NT", "BOFF0", "BOFF1", "BOFF2", "BOFF3"])
    def _sgmv_expand_kernel(
        buf_ptr,  # [KS, P, T, R] float32 partial sums
        b_ptr,  # [U, N, PR] (pages)
        ranks_ptr,  # [slots, P]
        pages_ptr,  # [slots, P, MAXP] int32
        y_ptr,  # [T, N]
        sorted_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_end_ptr,
        token_slot_ptr,  # [T] int32 (store mode: the rows of tokens with no adapter)
        NT,
        T,
        R,
        MAXP,
        OFF1,
        OFF2,
        OFF3,
        OFF4,
        BOFF0,
        BOFF1,
        BOFF2,
        BOFF3,
        KS,
        N_PER_PROG,  # columns of one projection per program (a multiple of BLOCK_N)
        P: tl.constexpr,
        stride_bs,
        stride_bn,
        stride_yt,
        PR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREFETCH: tl.constexpr,
        LINE: tl.constexpr,
        EARLY: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        RANK_SPLIT: tl.constexpr,  # BLOCK_R > 16: tiles of ranks <= 16 (and <= 32) take their own
        VEC: tl.constexpr,  # B's pages aligned to PR columns (_b_tile)
    ):
        # segment path (prefill-like): one tile of <= BLOCK_M tokens of one segment (one
        # adapter), one projection p, a range of N_PER_PROG output columns in BLOCK_N steps;
        # tensor-core dots. Store mode (not ACCUMULATE) writes y without reading it: the tile
        # programs their tokens' delta (zero where the adapter's rank is 0), programs past the
        # NT tiles zero the rows of tokens with no adapter (BLOCK_M tokens each).
        if USE_PDL and EARLY:
            gdc_launch_dependents()  # the next kernel may start (and load its weights) now
        tile = tl.program_id(0)
        ns = tl.program_id(1)
        p = tl.program_id(2)
        n_lo, n_hi = _proj_cols(p, OFF1, OFF2, OFF3, OFF4)
        n_start = n_lo + ns * N_PER_PROG
        if n_start >= n_hi:
            return
        n_end = tl.minimum(n_start + N_PER_PROG, n_hi)
        if not ACCUMULATE:
            if tile >= NT:  # the rows of tokens with no adapter (graph padding rows too)
                offs_t = (tile - NT) * BLOCK_M + tl.arange(0, BLOCK_M)
                ts = tl.load(token_slot_ptr + offs_t, mask=offs_t < T, other=0)
                none = (offs_t < T) & (ts < 0)
                if USE_PDL:
                    gdc_wait()  # y's earlier readers are done
                _zero_rows(y_ptr, offs_t.to(tl.int64), none, stride_yt, n_start, n_end, BLOCK_N)
                return
        slot = tl.load(tile_slot_ptr + tile)  # the three loads of one round trip
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        if slot < 0:
            return
        rank = tl.minimum(tl.load(ranks_ptr + slot * P + p), R)  # at most the partials' width
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tok = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        if rank == 0:
            if not ACCUMULATE:  # this adapter leaves projection p alone: its delta is zero
                if USE_PDL:
                    gdc_wait()
                _zero_rows(y_ptr, tok, mask_m, stride_yt, n_start, n_end, BLOCK_N)
            return
        page_row = pages_ptr + (slot * P + p) * MAXP
        boff = _pick4(p, BOFF0, BOFF1, BOFF2, BOFF3)
        b_p = b_ptr + boff
        if USE_PDL:
            if PREFETCH:
                # B rows [n_start, n_end) of the first page stream into L2 while the shrink
                # ends; only when one page holds the whole rank (a page's rows are PR wide)
                if rank == PR:
                    b_base = b_p + tl.load(page_row).to(tl.int64) * stride_bs
                    lo_e = n_start * stride_bn
                    n_lines = tl.cdiv((n_end - n_start) * stride_bn, LINE)
                    for i0 in range(0, n_lines, 256):
                        idx = i0 + tl.arange(0, 256)
                        prefetch_l2(b_base + lo_e + idx * LINE, idx < n_lines)
            gdc_wait()  # what the shrink wrote (buf) and y are visible after this
        y_rows = y_ptr + tok[:, None] * stride_yt
        x_rows = buf_ptr + p * T * R + tok[:, None] * R  # [BLOCK_M, 1]: split 0's partials
        KSTRIDE = P * T * R  # one K split's partials further
        if RANK_SPLIT:
            # the batch mixes ranks: a tile takes its own rank's bucket (lora_shrink's note)
            if rank <= 16:
                _seg_expand_rows(x_rows, KSTRIDE, KS, mask_m, y_rows, b_ptr, boff, page_row, rank,
                                 n_start, n_end, stride_bs, stride_bn, PR, 16, BLOCK_N, IEEE,
                                 ACCUMULATE, VEC)  # fmt: skip
            elif BLOCK_R > 32:
                if rank <= 32:
                    _seg_expand_rows(x_rows, KSTRIDE, KS, mask_m, y_rows, b_ptr, boff, page_row, rank,
                                     n_start, n_end, stride_bs, stride_bn, PR, 32, BLOCK_N,
                                     IEEE, ACCUMULATE, VEC)  # fmt: skip
                else:
                    _seg_expand_rows(x_rows, KSTRIDE, KS, mask_m, y_rows, b_ptr, boff, page_row, rank,
                                     n_start, n_end, stride_bs, stride_bn, PR, BLOCK_R, BLOCK_N,
                                     IEEE, ACCUMULATE, VEC)  # fmt: skip
            else:
                _seg_expand_rows(x_rows, KSTRIDE, KS, mask_m, y_rows, b_ptr, boff, page_row, rank,
                                 n_start, n_end, stride_bs, stride_bn, PR, BLOCK_R, BLOCK_N,
                                 IEEE, ACCUMULATE, VEC)  # fmt: skip
        else:
            _seg_expand_rows(x_rows, KSTRIDE, KS, mask_m, y_rows, b_ptr, boff, page_row, rank, n_start,
                             n_end, stride_bs, stride_bn, PR, BLOCK_R, BLOCK_N, IEEE,
                             ACCUMULATE, VEC)  # fmt: skip


@functools.lru_cache(maxsize=4096)  # pure in host ints: once per shape, not per launch
def _expand_config(
    T: int,
    R: int,
    outs: tuple[int, ...],
    on_gpu: bool,
    rows: bool,
    block_m: int,
    in_line: bool,
    sms: int = 132,
):
    """(BLOCK_R, BLOCK_N, N_PER_PROG, warps, one tile, preload): enough programs for a few
    waves, each a long N walk.

    Sized from the real work known on the host: ``T`` tokens (per-token path: ``T`` programs
    per N range; segment path: at least ``cdiv(T, block_m)`` real tiles when every token has
    an adapter), never from the padded tile count of a graph's meta. ``outs``: the columns of
    each projection. ``in_line``: the kernel runs alone on its stream (early launch), not
    beside another stream's GEMM."""
    P, max_out = len(outs), max(outs)
    if rows and on_gpu and R > 16:
        # a pool wider than rank 16: each token's own rank in 16-wide steps (a rank-16 adapter
        # takes one), [256, 16] tiles of B. Tiles of the pool's width ([32, 64] at 64) made
        # each program a walk of 150 small dependent loads over a projection's columns:
        # latency-bound, 6x its bytes (H200, decode at batch 256 with 132 adapters in a
        # rank-64 pool: the gate/up expand 345 us a layer; docs/benchmarks.md)
        if in_line:
            return 16, 256, 256, 4, True, False
        return _beside_gemm_tiles(16, T, sms)
    block_r = 16 if R <= 16 else 32 if R <= 32 else 64
    if rows:  # one token: a [BLOCK_N, BLOCK_R] tile of B per step (sm_90 build, 4 warps:
        # r16 x n256 and r32 x n128 64 registers, r64 x n64 168, r64 x n32 80)
        block_n = {16: 256, 32: 128, 64: 32}[block_r]
        units = T
    else:
        block_n = 128 if max_out >= 128 else 32
        units = cdiv(T, block_m)
    if not on_gpu:  # interpreter: small blocks so that tests walk several N and R steps
        block_r, block_n = min(block_r, 32), 32
    elif rows and block_r == 16:
        if not in_line:
            return _beside_gemm_tiles(block_r, T, sms)
        # in line, 4 warps: if one wave holds every program (4 per SM: a [512, 16] tile takes
        # 96 registers), each program's first tile loads before gdc_wait, overlapping the
        # previous kernel's tail, and its later tiles are one ahead; the fewest columns per
        # program that fit. Else runs of 256-column tiles without the early loads (those of
        # more programs than fit only compete). H100, bench_sgmv.py --variants, 64 tokens:
        # o, down expand 7.5 / 8.4 -> 6.1 / 6.8 us in one tile; the layer 78.7 -> 76.3 us
        # with qkv in two 512-column tiles (docs/benchmarks.md). Past one wave, runs of four
        # 256-column tiles (the MoE layer's (token, expert) pairs: H100, bench_moe_lora.py
        # --launch-variants, 256 / 2,048 tokens 0.776 / 1.947 -> 0.743 / 1.820 ms against a
        # pipelined loop over two)
        for bn, tiles in ((512, 1), (512, 2), (256, 8)):
            if T * sum(cdiv(o, bn * tiles) for o in outs) <= 4 * sms:
                return block_r, bn, bn * tiles, 4, True, True
        return block_r, 256, 1024, 4, True, False
    elif (
        not rows and not in_line and max_out >= 1024 and R > 16 and tokens_at_132_sms(T, sms) >= 256
    ):
        # the segment path beside the GEMMs (a decode graph of 256 over at most half as many
        # slots, e.g. the offline throughput's steps) in a pool wider than rank 16: 256-wide
        # tiles, four to a program, with the shrink's 2,048-wide K slices (H100, batch 256
        # over 32 Zipf adapters on 128 slots in a rank-64 pool: 15.47 -> 14.96 ms a step;
        # either alone ~15.2; sweep_decode_lora.py). Rank-16 pools: lora_shrink's note
        return block_r, 256, 1024, 4, False, False
    want = 8 * sms if on_gpu else 4  # a few waves of programs on this device's SMs
    n_blocks = cdiv(max_out, block_n)
    n_split = max(1, min(n_blocks, cdiv(want, max(1, units * P))))
    n_per = cdiv(n_blocks, n_split) * block_n
    return block_r, block_n, n_per, 4, n_per == block_n, False


def _beside_gemm_tiles(block_r: int, T: int, sms: int):
    """The per-token expand beside the GEMMs (a decode graph's side stream): runs of [256, 16]
    tiles of B per program, longer as the batch grows. One tile a program is ~5,400 programs
    a Llama-3-8B layer at batch 32 but ~43,000 at batch 256, each a chain of dependent loads
    (slot, rank and pages, then B) that the SMs beside the GEMMs hide only a few at a time
    (benchmarks/kernel_resources.py: 5 programs an SM at 8 warps). H100, decode step in a
    rank-64 pool, distinct adapters (sweep_decode_lora.py, docs/benchmarks.md), one tile ->
    this rule: batch 64 9.77 -> 9.61 ms (2 tiles); 128, with the shrink's longer K slices
    (lora_shrink._shrink_config), 13.41 -> 12.82 ms; 256 with 132 adapters 19.44 -> 17.21 ms
    (4 tiles, 4 warps); batch 32 within 0.5 % of one tile. Thresholds in tokens per SM."""
    t = tokens_at_132_sms(T, sms)
    if t >= 128:
        return block_r, 256, 1024, 4, True, False
    if t >= 64:
        return block_r, 256, 512, 8, True, False
    return block_r, 256, 256, 8, True, False


def _tile_run(one_tile: bool, block_n: int, n_per: int) -> int:
    """The per-token kernel's N_TILES: the tiles of a program's run, 0 where it takes the
    general loop (N_PER_PROG is not whole tiles). A rank past ``block_r`` (a pool wider than
    the tile) takes its first ``block_r`` columns in the run, the rest in the general loop."""
    fits = one_tile and n_per % block_n == 0
    return n_per // block_n if fits else 0


def token_path_sizes(R: int, outs: Sequence[int], device: torch.device, t_max: int) -> list[int]:
    """The fewest tokens that reach each compiled variant of the in-line per-token expand
    over 1..``t_max`` tokens (its tiles per program depend on the token count): one warm-up
    forward at each size compiles them all before a step needs one (``_warm_lora``)."""
    on_gpu = device.type == "cuda"
    sms = num_sms(device) if on_gpu else 132
    sizes, seen = [], set()
    for T in range(1, t_max + 1):
        _, block_n, n_per, warps, one_tile, preload = _expand_config(
            T, R, tuple(outs), on_gpu, True, 1, True, sms
        )
        key = (block_n, warps, _tile_run(one_tile, block_n, n_per), preload)
        if key not in seen:
            seen.add(key)
            sizes.append(T)
    return sizes


def lora_expand(
    buf: torch.Tensor,  # [KS, P, T, R] float32 partials from lora_shrink (R: its width)
    lora_b: torch.Tensor,  # [U, N, PAGE_ROWS] (the pool's strided view; scale folded in)
    ranks: torch.Tensor,  # [slots, P] int32
    pages: torch.Tensor,  # [slots, P, MAXP] int32: each projection's pages in rank order
    out_offsets: Sequence[int],  # [P+1] host ints into N
    meta: LoraMeta,
    y: torch.Tensor,  # [T, N], updated in place
    config: dict | None = None,  # tuning override: rows, block_n, n_per, num_warps, num_stages
    accumulate: bool = True,  # False: y = the delta (zeros where no adapter applies)
    early_launch: bool = True,  # as lora_shrink's: off beside another stream's GEMM
    b_offsets: Sequence[int] | None = None,  # [P] element offsets of each projection's B
) -> torch.Tensor:
    KS, P, T, R = buf.shape
    _, N, PR = lora_b.shape
    S_, P2, maxp = pages.shape
    R2 = maxp * PR
    offs = [int(o) for o in out_offsets]
    if len(offs) != P + 1 or offs[0] != 0 or offs[-1] != N or P > 4:
        raise ValueError(f"out_offsets {offs} must be [0, ..., N={N}] for P={P} <= 4 projections")
    if R > R2 or buf.dtype != torch.float32 or not buf.is_contiguous():
        raise ValueError("buf must be contiguous float32 [KS, P, T, R], R <= MAXP * PAGE_ROWS")
    if pages.dtype != torch.int32 or not pages.is_contiguous() or PR & (PR - 1) or P2 != P:
        raise ValueError("pages: contiguous int32 [slots, P, MAXP]; PAGE_ROWS a power of 2")
    if y.shape != (T, N) or y.stride(1) != 1 or lora_b.stride(2) != 1:
        raise ValueError("y must be [T, N] with lora_b's N, last dimensions contiguous")
    if y.dtype != lora_b.dtype:
        raise ValueError(f"dtype mismatch: y {y.dtype}, lora_b {lora_b.dtype}")
    if ranks.shape != (S_, P) or ranks.dtype != torch.int32:
        raise ValueError("ranks must be int32 [slots, P] with pages' slots")
    if meta.token_slot.shape[0] != T:
        raise ValueError("meta built for a different number of tokens")
    nt = meta.tile_seg.shape[0]
    if T == 0 or nt == 0 or meta.num_segments == 0:
        return y if accumulate else y.zero_()
    outs = tuple(offs[i + 1] - offs[i] for i in range(P))
    max_out = max(outs)
    rows = use_token_path(T, meta)
    if config:
        rows = config.get("rows", rows)
        early_launch = config.get("early", early_launch)
    sms = num_sms(y.device) if y.is_cuda else 132
    block_r, block_n, n_per, warps, one_tile, preload = _expand_config(
        T, R, outs, y.is_cuda, rows, meta.block_m, early_launch, sms
    )
    pdl = pdl_ok(y)
    prefetch = False  # measured: L2 prefetch of B before gdc_wait slowed the expand at 64 tokens
    cfg = {"num_warps": warps, "num_stages": 3, "launch_pdl": pdl}
    if config:
        block_n, n_per = config.get("block_n", block_n), config.get("n_per", n_per)
        cfg.update({k: v for k, v in config.items() if k in cfg})
        pdl = cfg["launch_pdl"]
        prefetch = config.get("prefetch", prefetch)
        preload = config.get("preload", preload)
    if config:  # an override of the shape without "one_tile" takes one tile if it is one
        one_tile = config.get("one_tile", n_per == block_n if "n_per" in config else one_tile)
    n_tiles = _tile_run(one_tile, block_n, n_per)
    # the segment path over ranks wider than 16 (buf's width): rank-bucketed tiles
    rank_split = not rows and block_r > 16 and (not config or config.get("rank_split", True))
    offs = offs + [N] * (5 - len(offs))
    ranks = ranks.contiguous()
    boffs = [int(o) for o in b_offsets] if b_offsets is not None else [0] * P
    if len(boffs) != P:
        raise ValueError(f"b_offsets {boffs} must have one offset per projection ({P})")
    boffs = boffs + [0] * (4 - P)
    tail = (T, R, maxp, offs[1], offs[2], offs[3], offs[4], *boffs, KS, n_per, P)
    strides = (lora_b.stride(0), lora_b.stride(1), y.stride(0))
    # each page's PR columns of a row one aligned vector (_b_tile): the pool's layout
    vec = all(v % PR == 0 for v in (*boffs, strides[0], strides[1], lora_b.storage_offset()))
    n_split = cdiv(max_out, n_per)
    if rows:  # grid (T, N ranges, P): static for a given T
        _bgmv_expand_kernel[(T, n_split, P)](
            buf,
            lora_b,
            ranks,
            pages,
            y,
            meta.token_slot,
            *tail,
            *strides,
            PR=PR,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            BLOCK_KS=16,
            USE_PDL=pdl,
            ACCUMULATE=accumulate,
            EARLY=early_launch,
            ONE_TILE=n_tiles > 0,
            N_TILES=max(n_tiles, 1),
            PRELOAD=preload and pdl,
            VEC=vec,
            **cfg,
        )
        return y
    # store mode: cdiv(T, BLOCK_M) more programs zero the rows of tokens with no adapter
    extra = 0 if accumulate else cdiv(T, meta.block_m)
    _sgmv_expand_kernel[(nt + extra, n_split, P)](
        buf,
        lora_b,
        ranks,
        pages,
        y,
        meta.sorted_tokens,
        meta.tile_slot,
        meta.tile_start,
        meta.tile_end,
        meta.token_slot,
        nt,
        *tail,
        *strides,
        PR=PR,
        BLOCK_M=meta.block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        IEEE=y.dtype == torch.float32,
        USE_PDL=pdl,
        PREFETCH=prefetch,
        LINE=128 // y.element_size(),
        EARLY=early_launch,
        ACCUMULATE=accumulate,
        RANK_SPLIT=rank_split,
        VEC=vec,
        **cfg,
    )
    return y
