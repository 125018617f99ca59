"""SGMV shrink/expand vs the torch references (Punica/vLLM style test matrix)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close, gpu

from loraplex.engine.kernels import LoraMeta, build_lora_meta
from loraplex.engine.kernels.lora_expand import _expand_config, lora_expand, lora_expand_ref
from loraplex.engine.kernels.lora_shrink import (
    _shrink_config,
    lora_shrink,
    lora_shrink_ref,
    seg_rank,
    use_token_path,
)

PATTERNS = ["distinct", "identical", "zipf", "some_none"]
PAGE_ROWS = 8  # the pool's (engine/lora/pool.py)


def one_page_each(num_slots: int, P: int) -> torch.Tensor:
    """The padded layout as a page table: slot s is one page of max_rank rows, at s."""
    return torch.arange(num_slots, dtype=torch.int32)[:, None, None].expand(-1, P, 1).contiguous()


def shrink_ref(x, a, ranks, meta):
    """The reference over the padded layout ``a[slots, P, R, in]`` (one page per slot)."""
    return lora_shrink_ref(x, a, ranks, one_page_each(a.shape[0], a.shape[1]), meta)


def expand_ref(buf, b, ranks, offsets, meta, y, accumulate=True):
    pages = one_page_each(b.shape[0], ranks.shape[1])
    return lora_expand_ref(buf, b, ranks, pages, offsets, meta, y, accumulate=accumulate)


def to_paged(a, b, offsets, gen, page_rows=PAGE_ROWS, granule=16, device=DEVICE):
    """``a[slots, P, R, in]``, ``b[slots, N, R]`` -> the pool's layout: a page per projection
    holds ``page_rows`` rows of its A then the matching columns of its B; views ``A[U, P,
    page_rows, in]`` (stride 0 over P), ``B[U, N, page_rows]`` of one arena (NaN between
    pages) whose first index is a granule offset, ``pages[slots, P, R / page_rows]`` and
    ``b_offsets[P]``; the pages in a random order with free pages between them."""
    S, P, R, K = a.shape
    outs = [offsets[p + 1] - offsets[p] for p in range(P)]
    maxp = R // page_rows
    pg = -(-(page_rows * K + max(outs) * page_rows) // granule)
    n = 2 * S * P * maxp  # half of the pages stay free
    order = torch.randperm(n, generator=gen)[: S * P * maxp]
    # past the last page: the B view spans all N columns from every page's start
    size = (n + 1) * pg * granule + sum(outs) * page_rows
    arena = torch.full((size,), float("nan"), dtype=a.dtype)
    pages = (order * pg).to(torch.int32).view(S, P, maxp)
    for s in range(S):
        for p in range(P):
            for j in range(maxp):
                base = int(pages[s, p, j]) * granule
                rows = slice(j * page_rows, (j + 1) * page_rows)
                arena[base : base + page_rows * K] = a[s, p, rows].reshape(-1)
                end = base + page_rows * K
                cols = b[s, offsets[p] : offsets[p + 1], rows]
                arena[end : end + outs[p] * page_rows] = cols.reshape(-1)
    arena = arena.to(device)
    units = n * pg
    A = arena.as_strided((units, P, page_rows, K), (granule, 0, K, 1), 0)
    B = arena.as_strided((units, sum(outs), page_rows), (granule, page_rows, 1), page_rows * K)
    b_offsets = [-offsets[p] * page_rows for p in range(P)]
    return A, B, pages.to(device), b_offsets


def make_token_slot(T: int, pattern: str, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "distinct":
        slot = torch.randperm(num_slots, generator=gen)[:T] if T <= num_slots else None
        if slot is None:
            slot = torch.arange(T) % num_slots
    elif pattern == "identical":
        slot = torch.full((T,), int(torch.randint(num_slots, (1,), generator=gen)))
    elif pattern == "zipf":
        w = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.1
        slot = torch.multinomial(w, T, replacement=True, generator=gen)
    else:  # some tokens with no adapter
        slot = torch.randint(num_slots, (T,), generator=gen)
        slot[torch.rand(T, generator=gen) < 0.4] = -1
    return slot.to(torch.int32)


def make_weights(num_slots, outs, max_rank, k, dtype, gen, rank_choices=(1, 8, 64)):
    P = len(outs)
    N = sum(outs)
    a = (torch.randn(num_slots, P, max_rank, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(num_slots, N, max_rank, generator=gen) / max_rank**0.5).to(dtype)
    rc = torch.tensor([r for r in rank_choices if r <= max_rank])
    ranks = rc[torch.randint(len(rc), (num_slots, P), generator=gen)].to(torch.int32)
    ranks[0, -1] = 0  # an adapter that does not touch one projection
    offsets = [0]
    for o in outs:
        offsets.append(offsets[-1] + o)
    return a, b, ranks, offsets


def run_case(
    T, k, outs, pattern, dtype, num_slots, max_rank, seed, max_segments=None, config=None,
    page_rows=PAGE_ROWS, step_rank=None, nan_past_rank=False, early_launch=True, **kw,
):  # fmt: skip
    """-> the shrink's partials. ``step_rank``: lora_shrink's ``max_rank`` (the largest rank
    of the slots the tokens use, as the runner claims it). ``early_launch=False``: the launch
    configs of kernels beside another stream's GEMMs (a decode graph's side stream)."""
    gen = torch.Generator().manual_seed(seed)
    token_slot = make_token_slot(T, pattern, num_slots, gen)
    if max_segments is not None and T > 1:
        token_slot[-1] = -1  # a graph's padding row (bucket > batch)
    a, b, ranks, offsets = make_weights(num_slots, outs, max_rank, k, dtype, gen, **kw)
    if nan_past_rank:  # a page's rows past an adapter's rank hold NaN (the arena is not zeroed)
        for sl in range(num_slots):
            for p in range(len(outs)):
                r = int(ranks[sl, p])
                a[sl, p, r:] = float("nan")
                b[sl, offsets[p] : offsets[p + 1], r:] = float("nan")
    x = torch.randn(T, k, generator=gen).to(dtype)
    y0 = torch.randn(T, offsets[-1], generator=gen).to(dtype)
    meta = build_lora_meta(token_slot, max_segments=max_segments)

    buf_ref = shrink_ref(x.float(), a.float(), ranks, meta)
    y_ref = expand_ref(buf_ref, b.float(), ranks, offsets, meta, y0.float().clone())

    dev = DEVICE
    meta_d = meta.to(dev)
    A, B, pages, boffs = to_paged(a, b, offsets, gen, page_rows)
    rk = ranks.to(dev)
    buf = lora_shrink(
        x.to(dev), A, rk, pages, meta_d, config=config, max_rank=step_rank,
        early_launch=early_launch,
    )  # fmt: skip
    # only what the expand reads is defined: tokens with an adapter, r < rank
    W = buf.shape[3]
    slot = token_slot.long().clamp_min(0)
    r_tok = ranks.long()[slot].T  # [P, T]
    defined = (token_slot >= 0)[None, :, None] & (
        torch.arange(W)[None, None, :] < r_tok[:, :, None]
    )
    assert_close(buf.sum(0).cpu()[defined], buf_ref.sum(0)[..., :W][defined], dtype)
    y = y0.to(dev).clone()
    lora_expand(
        buf, B, rk, pages, offsets, meta_d, y, config=config, b_offsets=boffs,
        early_launch=early_launch,
    )  # fmt: skip
    assert_close(y, y_ref, dtype)
    none = token_slot < 0
    assert torch.equal(y.cpu()[none], y0[none]), "a token with no adapter was touched"
    return buf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [1, 3, 7])
def test_sgmv_hidden_2049(T, pattern, dtype):
    # q/k/v-like group with odd sizes and ranks 1, 8, 64 mixed
    run_case(T, 2049, [2049, 33, 33], pattern, dtype, num_slots=8, max_rank=64, seed=T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sgmv_133_tokens(pattern, dtype):
    run_case(133, 96, [80, 24], pattern, dtype, num_slots=12, max_rank=64, seed=133)


def test_sgmv_padded_meta_for_graphs():
    # segment/tile arrays padded to max_segments (static shapes) give the same result
    run_case(7, 65, [40], "zipf", torch.float32, num_slots=6, max_rank=16, seed=3, max_segments=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", ["identical", "some_none", "distinct"])
@pytest.mark.parametrize("T", [1, 7, 24])
def test_sgmv_graph_padded_decode(T, pattern, dtype):
    # a decode graph's meta: padded to the slot count (16 > segments), the last row a padding
    # row (-1); "identical" = one adapter for the whole batch (all its tokens in one segment)
    run_case(T, 257, [96, 40], pattern, dtype, num_slots=16, max_rank=64, seed=T, max_segments=16)


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sgmv_both_paths(pattern, rows):
    # the per-token and the segment kernel agree with the reference on the same cases,
    # exact and graph-padded metas, whichever the host would pick
    for max_segments in (None, 12):
        cfg = {"rows": rows}
        run_case(19, 130, [70, 33, 9], pattern, torch.float32, 12, 64, 5, max_segments, cfg)


# the per-token expand's one-tile kernel (one [BLOCK_N, BLOCK_R] tile of B per program, every
# load issued up front): the decode default at rank 16 on the GPU; the interpreter takes it
# when a program's column range is one BLOCK_N tile and the pool rank fits BLOCK_R
ONE_TILE = {"rows": True, "block_n": 32, "n_per": 32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [3, 21])
def test_expand_one_tile_per_token(T, pattern, dtype):
    # ranks 1, 8, 16 in a rank-16 pool (columns past a rank hold garbage partial sums that must
    # be dropped) and a projection of rank 0; exact and graph-padded metas
    for max_segments in (None, 16):
        run_case(
            T, 130, [70, 33, 9], pattern, dtype, num_slots=16, max_rank=16, seed=T,
            max_segments=max_segments, config=ONE_TILE, rank_choices=(1, 8, 16),
        )  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
def test_expand_one_tile_in_a_wider_pool(pattern):
    # a rank-64 pool, tiles 32 ranks wide (the interpreter's; 16 on the GPU): ranks up to the
    # tile in the one-tile run alone, wider ones (40, 64) their first 32 columns there and the
    # rest in the general loop after it, adding to what the run stored
    for max_segments in (None, 16):
        run_case(
            21, 130, [70, 33, 9], pattern, torch.float16, num_slots=16, max_rank=64, seed=3,
            max_segments=max_segments, config=ONE_TILE, rank_choices=(8, 16, 40, 64),
        )  # fmt: skip


# the in-line defaults on the GPU at rank 16: the shrink's one-tile kernel (a program's whole
# K slice one [BLOCK_R, BLOCK_K] tile of A) and the expand's run of tiles (N_TILES per
# program, each next one loaded before the one ahead is reduced). Widths 70, 33, 9 in 3-tile
# ranges of 32 columns: the last tile of each range partial or empty; K 130 in 64-wide slices
TILES = {"rows": True, "one_tile": True, "block_k": 64, "k_per": 64, "block_n": 32, "n_per": 96}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [3, 21])
def test_one_tile_shrink_and_tiled_expand(T, pattern, dtype):
    for max_segments in (None, 16):
        run_case(
            T, 130, [70, 33, 9], pattern, dtype, num_slots=16, max_rank=16, seed=T + 100,
            max_segments=max_segments, config=TILES, rank_choices=(1, 8, 16),
        )  # fmt: skip


@pytest.mark.parametrize("config", [{"rows": True}, {"rows": False}, ONE_TILE, TILES])
def test_rows_past_the_rank_are_never_used(config):
    # ranks that end inside a page (3, 12) with NaN in the page's rows past them: the expand
    # reads B a whole page at a time (vector loads) and must drop those columns, not multiply
    # them by a zero partial sum (0 * NaN); the references never read them
    for max_segments in (None, 16):
        run_case(
            21, 130, [70, 33, 9], "some_none", torch.float16, num_slots=16, max_rank=16,
            seed=7, max_segments=max_segments, config=config, rank_choices=(3, 12, 16),
            nan_past_rank=True,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [True, False, "one_tile", "tiles"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_expand_store_mode(pattern, rows, dtype):
    # accumulate=False writes the delta itself over stale memory: zero rows for tokens with no
    # adapter (and graph padding rows), zero columns where an adapter's projection has rank 0
    # max rank 64: rank steps of 32 in the interpreter; 16: one step
    for max_segments, max_rank in ((None, 64), (12, 64), (None, 16), (12, 16)):
        rank_choices = (1, 8, 64) if max_rank == 64 else (1, 8, 16)
        gen = torch.Generator().manual_seed(11)
        T, k, outs = 21, 130, [70, 33, 9]
        token_slot = make_token_slot(T, pattern, 12, gen)
        token_slot[-1] = -1
        a, b, ranks, offsets = make_weights(12, outs, max_rank, k, dtype, gen, rank_choices)
        ranks[:, 1] = torch.where(torch.arange(12) % 3 == 0, 0, ranks[:, 1])
        x = torch.randn(T, k, generator=gen).to(dtype)
        meta = build_lora_meta(token_slot, max_segments=max_segments)
        buf_ref = shrink_ref(x.float(), a.float(), ranks, meta)
        zero = torch.zeros(T, offsets[-1])
        d_ref = expand_ref(buf_ref, b.float(), ranks, offsets, meta, zero)
        m = meta.to(DEVICE)
        cfg = {"one_tile": ONE_TILE, "tiles": TILES}.get(rows) or {"rows": rows}
        if rows == "tiles" and max_rank > 16:
            continue  # the tiled kernels need the pool rank within one BLOCK_R step
        A, B, pages, boffs = to_paged(a, b, offsets, gen)
        rk = ranks.to(DEVICE)
        buf = lora_shrink(x.to(DEVICE), A, rk, pages, m, config=cfg)
        d = torch.full((T, offsets[-1]), float("nan"), dtype=dtype, device=DEVICE)
        lora_expand(buf, B, rk, pages, offsets, m, d, cfg, accumulate=False, b_offsets=boffs)
        assert not d.isnan().any(), "store mode left stale values"
        assert_close(d, d_ref, dtype)
        assert not d.cpu()[token_slot < 0].any()
        # the reference in store mode agrees with the accumulate reference from zero
        d2 = torch.full_like(zero, 7.0)
        expand_ref(buf_ref, b.float(), ranks, offsets, meta, d2, accumulate=False)
        torch.testing.assert_close(d2, d_ref)


def test_expand_store_mode_no_adapter_at_all():
    meta = build_lora_meta(torch.full((3,), -1, dtype=torch.int32)).to(DEVICE)
    buf = torch.zeros(1, 1, 3, 8, device=DEVICE)
    b = torch.randn(2, 16, 8, device=DEVICE)
    y = torch.ones(3, 16, device=DEVICE)
    ranks = torch.ones(2, 1, dtype=torch.int32, device=DEVICE)
    pages = one_page_each(2, 1).to(DEVICE)
    lora_expand(buf, b, ranks, pages, [0, 16], meta, y, accumulate=False)
    assert not y.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_path_reads_token_slot_only(dtype):
    # a decode graph's static meta updates only token_slot on buckets that take the per-token
    # path (cuda_graphs.DecodeGraphs.run): stale segment arrays must not change the result
    gen = torch.Generator().manual_seed(4)
    T, k, outs, slots = 7, 96, [40, 24], 16
    a, b, ranks, offsets = make_weights(slots, outs, 16, k, dtype, gen, rank_choices=(1, 8, 16))
    x = torch.randn(T, k, generator=gen).to(dtype)
    y0 = torch.randn(T, offsets[-1], generator=gen).to(dtype)
    true_slot = make_token_slot(T, "some_none", slots, gen)
    stale = build_lora_meta(torch.full((T,), -1, dtype=torch.int32), max_segments=slots)
    assert use_token_path(T, stale)
    stale.token_slot.copy_(true_slot)
    meta = build_lora_meta(true_slot, max_segments=slots)
    want = expand_ref(
        shrink_ref(x.float(), a.float(), ranks, meta), b.float(), ranks, offsets, meta,
        y0.float().clone(),
    )  # fmt: skip
    m = stale.to(DEVICE)
    rk = ranks.to(DEVICE)
    A, B, pages, boffs = to_paged(a, b, offsets, gen)
    buf = lora_shrink(x.to(DEVICE), A, rk, pages, m)
    y = lora_expand(buf, B, rk, pages, offsets, m, y0.to(DEVICE).clone(), b_offsets=boffs)
    assert_close(y, want, dtype)


def meta_oracle(tok: list[int], max_segments, block_m: int) -> dict:
    """build_lora_meta's arrays by plain Python loops (an independent statement of the layout)."""
    slots = sorted({s for s in tok if s >= 0})
    order = [i for s in slots for i, x in enumerate(tok) if x == s]
    order += [i for i, x in enumerate(tok) if x < 0]
    lens = [tok.count(s) for s in slots]
    if max_segments is not None:
        pad = max_segments - len(slots)
        slots, lens = slots + [-1] * pad, lens + [0] * pad
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    tiles = []  # (segment, start, slot, end)
    for s, n in enumerate(lens):
        for j in range(0, n, block_m):
            tiles.append((s, starts[s] + j, slots[s], starts[s + 1]))
    nt = (len(tok) + block_m - 1) // block_m + len(slots)
    tiles += [(-1, 0, -1, 0)] * (nt - len(tiles))
    cols = list(zip(*tiles, strict=True)) if tiles else [[], [], [], []]
    return {
        "token_slot": tok,
        "sorted_tokens": order,
        "seg_start": starts,
        "seg_slot": slots,
        "tile_seg": list(cols[0]),
        "tile_start": list(cols[1]),
        "tile_slot": list(cols[2]),
        "tile_end": list(cols[3]),
        "num_segments": len(slots),
        "num_lora_tokens": len(tok) if max_segments is not None else sum(x >= 0 for x in tok),
    }


@pytest.mark.parametrize("block_m", [16, 4])
def test_meta_matches_loop_oracle(block_m):
    # the numpy grouping against plain loops: random patterns, exact and padded, empty, all -1
    gen = torch.Generator().manual_seed(9)
    cases = [torch.zeros(0, dtype=torch.int32), torch.full((5,), -1, dtype=torch.int32)]
    for T in (1, 3, 7, 64, 133, 256):
        for pattern in PATTERNS:
            cases.append(make_token_slot(T, pattern, 32, gen))
    for tok in cases:
        for max_segments in (None, 32):
            m = build_lora_meta(tok, max_segments, block_m)
            want = meta_oracle(tok.tolist(), max_segments, block_m)
            for f, v in want.items():
                got = getattr(m, f)
                if isinstance(got, torch.Tensor):
                    assert got.dtype == torch.int32, f
                    got = got.tolist()
                assert got == v, (f, tok.tolist(), max_segments)


@pytest.mark.parametrize("block_m", [16, 4])
def test_grouped_meta_matches_loop_oracle(block_m):
    # the device grouping (torch ops, static shapes: the MoE pairs) against the same loops:
    # the exact arrays, then padding (empty segments at the end, slot -1 tiles)
    gen = torch.Generator().manual_seed(11)
    cases = [torch.zeros(0, dtype=torch.int32), torch.full((5,), -1, dtype=torch.int32)]
    for T in (1, 3, 7, 64, 133):
        for pattern in PATTERNS:
            cases.append(make_token_slot(T, pattern, 32, gen))
    for tok in cases:
        for bound in (None, 32, 500):
            m = LoraMeta.grouped(tok, bound, block_m)
            want = meta_oracle(tok.tolist(), None, block_m)
            S, T = want["num_segments"], len(tok)
            n_tiles = sum(t >= 0 for t in want["tile_seg"])
            segs = T if bound is None else min(T, bound)
            assert m.seg_slot.shape[0] == segs and m.tile_slot.shape[0] == min(
                T, T // block_m + segs
            )
            assert m.sorted_tokens.tolist() == want["sorted_tokens"]
            assert m.token_slot.tolist() == want["token_slot"]
            assert m.seg_slot.tolist() == want["seg_slot"] + [-1] * (segs - S)
            assert m.seg_start.tolist() == want["seg_start"] + want["seg_start"][-1:] * (segs - S)
            for f in ("tile_seg", "tile_start", "tile_slot", "tile_end"):
                got = getattr(m, f).tolist()
                assert got[:n_tiles] == want[f][:n_tiles], (f, tok.tolist())
            assert set(m.tile_slot.tolist()[n_tiles:]) <= {-1}
            assert not use_token_path(T, m) or T < 2


def test_token_path_choice():
    # host ints only: padded decode metas take the per-token path, prefill the segment path
    one = torch.zeros(32, dtype=torch.int32)
    assert use_token_path(32, build_lora_meta(one, max_segments=128))
    assert not use_token_path(32, build_lora_meta(one))
    assert use_token_path(32, build_lora_meta(torch.arange(32, dtype=torch.int32)))
    assert not use_token_path(256, build_lora_meta(one[:1].expand(256), max_segments=128))


def test_sgmv_no_adapter_at_all():
    run_case(5, 64, [32], "some_none", torch.float32, num_slots=1, max_rank=8, seed=0)
    x = torch.randn(4, 64)
    meta = build_lora_meta(torch.full((4,), -1, dtype=torch.int32)).to(DEVICE)
    a = torch.randn(2, 1, 8, 64)
    ones = torch.ones(2, 1, dtype=torch.int32).to(DEVICE)
    buf = lora_shrink(x.to(DEVICE), a.to(DEVICE), ones, one_page_each(2, 1).to(DEVICE), meta)
    assert not buf.any()


def test_meta_groups_tokens():
    ts = torch.tensor([2, -1, 0, 2, 2, -1, 1, 0], dtype=torch.int32)
    m = build_lora_meta(ts, block_m=2)
    assert m.num_segments == 3
    assert m.seg_slot.tolist() == [0, 1, 2]
    assert m.seg_start.tolist() == [0, 2, 3, 6]
    assert m.sorted_tokens.tolist() == [2, 7, 6, 0, 3, 4, 1, 5]
    assert m.tile_seg.tolist()[:4] == [0, 1, 2, 2] and m.tile_start.tolist()[:4] == [0, 2, 3, 5]
    padded = build_lora_meta(ts, max_segments=5, block_m=2)
    assert padded.seg_start.tolist() == [0, 2, 3, 6, 6, 6]
    assert padded.tile_seg.shape[0] == 4 + 5


# Llama-3-8B projection groups: (in, outs)
LLAMA_GROUPS = {
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}


@gpu
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T", [1, 7, 64, 133])
@pytest.mark.parametrize("group", list(LLAMA_GROUPS))
def test_sgmv_llama_bf16(group, T, pattern):
    k, outs = LLAMA_GROUPS[group]
    run_case(
        T,
        k,
        outs,
        pattern,
        torch.bfloat16,
        num_slots=16,
        max_rank=64,
        seed=T,
        rank_choices=(8, 16, 64),
    )


@gpu
@pytest.mark.parametrize("pattern", ["zipf", "some_none"])
@pytest.mark.parametrize("T", [64, 133, 1024])
@pytest.mark.parametrize("group", list(LLAMA_GROUPS))
@pytest.mark.parametrize("choices", [(8, 16), (8, 16, 32), (8, 16, 32, 64)])
def test_sgmv_llama_bf16_step_rank(choices, group, T, pattern):
    # the segment path at Llama shapes in a rank-64 pool, sized by the step's largest rank
    # (16, 32, 64: BLOCK_R 16 / 32 / 64 with rank buckets)
    k, outs = LLAMA_GROUPS[group]
    buf = run_case(
        T, k, outs, pattern, torch.bfloat16, num_slots=16, max_rank=64, seed=T,
        config={"rows": False}, step_rank=max(choices), rank_choices=choices,
    )  # fmt: skip
    assert buf.shape[3] == max(choices)


@gpu
@pytest.mark.parametrize("pattern", ["identical", "some_none", "distinct"])
@pytest.mark.parametrize("T", [1, 32, 128])
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_sgmv_llama_bf16_graph_padded(group, T, pattern):
    # decode graphs on 128 slots: metadata padded to 128 segments, the last row padding;
    # "identical" is one adapter for the whole batch (the per-token path at every T here)
    k, outs = LLAMA_GROUPS[group]
    run_case(
        T,
        k,
        outs,
        pattern,
        torch.bfloat16,
        num_slots=128,
        max_rank=16,
        seed=T,
        max_segments=128,
        rank_choices=(8, 16),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [True, False])
def test_decode_graph_launch_shapes(rows, dtype):
    # the shapes the GPU rules take at large decode batches beside the GEMMs, walked in the
    # interpreter: runs of four 256-wide B tiles per expand program (per-token path; segment
    # path: 256-wide tiles, four to a program) over 2,048-wide shrink K slices, ranks 8-64
    # in a rank-64 pool with tokens of no adapter among them
    cfg = {"rows": rows, "block_n": 256, "n_per": 1024, "num_warps": 4, "k_per": 2048}
    if rows:
        cfg["one_tile"] = True
    run_case(
        40, 4160, [1100, 300], "some_none", dtype, num_slots=6, max_rank=64, seed=5,
        config=cfg, early_launch=False,
    )  # fmt: skip


@pytest.mark.parametrize("sms", [132, 78])
def test_segment_rule_beside_the_gemms_takes_pools_wider_than_rank_16(sms):
    # the segment path beside the GEMMs at a decode graph of 256 (at 132 SMs): long K slices
    # and runs of four B tiles in a rank-64 pool; in a rank-16 pool the split by waves, which
    # measured faster there (H100, offline throughput; docs/benchmarks.md). Neither in line.
    T = -(-256 * sms // 132)  # as many tokens per SM as 256 on 132
    for K, outs in ((4096, (4096, 1024, 1024)), (14336, (4096,))):
        P = len(outs)
        wide = _shrink_config(T, K, P, 64, True, False, 64, in_line=False, sms=sms)
        narrow = _shrink_config(T, K, P, 16, True, False, 64, in_line=False, sms=sms)
        inline = _shrink_config(T, K, P, 64, True, False, 64, in_line=True, sms=sms)
        assert wide[2] == 2048
        assert narrow[2] != 2048 and inline[2] != 2048
        assert _expand_config(T, 64, outs, True, False, 64, False, sms)[1:3] == (256, 1024)
        assert _expand_config(T, 16, outs, True, False, 64, False, sms)[1:3] != (256, 1024)
        # below a graph of 256 the split by waves, whatever the pool
        half = _shrink_config(T // 2, K, P, 64, True, False, 64, in_line=False, sms=sms)
        assert half[2] != 2048


@gpu
@pytest.mark.parametrize("rows", [False, True])  # (first: the paths alternate in the run)
@pytest.mark.parametrize("early_launch", [False, True])
@pytest.mark.parametrize("pool_rank", [16, 64])
@pytest.mark.parametrize("T", [32, 64, 128, 256])
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_decode_launch_rules_bf16(rows, group, T, pool_rank, early_launch):
    # the default launch configs at decode batch sizes, beside the GEMMs (early_launch
    # False; per-token path: runs of 1, 2 or 4 B tiles per expand program and K slices of 256
    # to 2,048 as the batch grows; segment path at 256 in the rank-64 pool: four 256-wide
    # tiles a program over 2,048-wide K slices) and in line (per-token path past one wave:
    # runs of four tiles), in a rank-16 pool and the engine's rank-64 pool of mixed ranks
    k, outs = LLAMA_GROUPS[group]
    choices = (8, 16) if pool_rank == 16 else (8, 16, 32, 64)
    run_case(
        T, k, outs, "zipf", torch.bfloat16, num_slots=64, max_rank=pool_rank, seed=T,
        max_segments=64, rank_choices=choices, early_launch=early_launch,
        config={"rows": rows}, step_rank=pool_rank,
    )  # fmt: skip


@gpu
@pytest.mark.parametrize("tiles", [1, 2])
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("T", [1, 64, 133])
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_expand_one_tile_preload_bf16(group, T, accumulate, tiles):
    # the tiled per-token expand with its first B tile loaded before gdc_wait (PDL on the
    # H100), over the in-line shrink (one A tile per program, also loaded before gdc_wait)
    # that launches its dependents early: the same result as the reference
    k, outs = LLAMA_GROUPS[group]
    gen = torch.Generator().manual_seed(T)
    token_slot = make_token_slot(T, "some_none", 32, gen)
    a, b, ranks, offsets = make_weights(32, outs, 16, k, torch.bfloat16, gen, (8, 16))
    x = torch.randn(T, k, generator=gen).to(torch.bfloat16)
    y0 = torch.randn(T, offsets[-1], generator=gen).to(torch.bfloat16)
    meta = build_lora_meta(token_slot, max_segments=32)
    base = y0.float() if accumulate else torch.zeros(T, offsets[-1])
    want = expand_ref(
        shrink_ref(x.float(), a.float(), ranks, meta), b.float(), ranks, offsets, meta,
        base.clone(),
    )  # fmt: skip
    m, rk = meta.to("cuda"), ranks.cuda()
    A, B, pages, boffs = to_paged(a, b, offsets, gen)
    buf = lora_shrink(x.cuda(), A, rk, pages, m, config={"rows": True})
    y = y0.cuda() if accumulate else torch.full_like(y0, float("nan")).cuda()
    # 1 or 2 [512, 16] tiles per program whatever the program count (the in-line default
    # takes the loop, where preload does not apply, for gate_up at 64 and 133 tokens)
    cfg = {"rows": True, "one_tile": True, "block_n": 512, "n_per": 512 * tiles,
           "num_warps": 4, "preload": True}  # fmt: skip
    lora_expand(
        buf, B, rk, pages, offsets, m, y, config=cfg, accumulate=accumulate, b_offsets=boffs
    )
    assert_close(y, want, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("page_rows", [8, 16, 64])
def test_paged_layouts_agree(page_rows, rows, dtype):
    # pages of 8 and 16 rows and one page of the max rank per projection give the same
    # result; ranks 8/16/32/64 mixed in one batch, a projection of rank 0
    run_case(
        21, 130, [70, 33, 9], "zipf", dtype, num_slots=12, max_rank=64, seed=page_rows,
        config={"rows": rows}, page_rows=page_rows, rank_choices=(8, 16, 32, 64),
    )  # fmt: skip


def test_paged_reference_equals_padded():
    # the paged references read what the padded ones do, wherever the pages sit
    gen = torch.Generator().manual_seed(2)
    a, b, ranks, offsets = make_weights(5, [24, 8], 32, 40, torch.float32, gen, (1, 8, 17, 32))
    tok = make_token_slot(9, "some_none", 5, gen)
    meta = build_lora_meta(tok)
    x = torch.randn(9, 40, generator=gen)
    A, B, pages, boffs = to_paged(a, b, offsets, gen, device="cpu")
    buf = lora_shrink_ref(x, A, ranks, pages, meta)
    want = shrink_ref(x, a, ranks, meta)
    torch.testing.assert_close(buf, want)
    y = lora_expand_ref(buf, B, ranks, pages, offsets, meta, torch.zeros(9, 32), b_offsets=boffs)
    torch.testing.assert_close(y, expand_ref(want, b, ranks, offsets, meta, torch.zeros(9, 32)))


@pytest.mark.parametrize("rank_split", [True, False])
@pytest.mark.parametrize("pattern", ["distinct", "some_none"])
def test_token_path_rank_buckets(pattern, rank_split):
    # ranks 8 to 64 mixed in a rank-64 pool on the per-token path: tokens of rank <= 16 take
    # the 16-row tiles (rank_split), the others the pool's; both equal the reference
    cfg = {"rows": True, "rank_split": rank_split}
    run_case(7, 200, [96, 40], pattern, torch.float32, num_slots=8, max_rank=64, seed=5,
             config=cfg, rank_choices=(8, 16, 24, 32, 64))  # fmt: skip


def test_seg_rank():
    # the step's largest rank rounded up to 16 (tl.dot's least), within the pool's
    assert seg_rank(None, 64) == 64
    assert [seg_rank(r, 64) for r in (0, 1, 8, 16, 17, 32, 33, 48, 64, 100)] == [
        16, 16, 16, 16, 32, 32, 48, 48, 64, 64,
    ]  # fmt: skip
    assert seg_rank(8, 8) == 8  # a pool of rank 8: its own width


# a pool of max rank 64 holding adapters of ranks 8, 16, 32 (and a projection of rank 0): the
# segment path sizes its partials by the step's largest rank, not the pool's
@pytest.mark.parametrize("rank_split", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("choices, width", [((8, 16, 32), 32), ((8, 16), 16), ((8,), 16)])
def test_segment_path_sized_by_step_rank(choices, width, dtype, rank_split):
    cfg = {"rows": False, "rank_split": rank_split}
    # tokens with no adapter among several adapters; exact and graph-padded metas
    for pattern, max_segments in (("some_none", None), ("zipf", 12)):
        buf = run_case(
            40, 130, [70, 33, 9], pattern, dtype, num_slots=12, max_rank=64, seed=len(choices),
            max_segments=max_segments, config=cfg, step_rank=max(choices), rank_choices=choices,
        )  # fmt: skip
        assert buf.shape[3] == width, buf.shape


def test_segment_path_mixed_ranks_8_to_64():
    # ranks 8-64 mixed in one step: the full width, each tile in its rank's bucket
    for rank_split in (True, False):
        buf = run_case(
            40, 130, [70, 33], "zipf", torch.float32, num_slots=12, max_rank=64, seed=9,
            config={"rows": False, "rank_split": rank_split}, step_rank=64,
            rank_choices=(8, 16, 24, 32, 64),
        )  # fmt: skip
        assert buf.shape[3] == 64


def test_segment_width_old_behaviour_and_token_path():
    # "r_eff": False keeps the pool's width (the old segment path); the per-token path keeps
    # it whatever the step's rank (a decode graph's shapes must not depend on the batch)
    kw = dict(num_slots=12, max_rank=64, seed=3, step_rank=16, rank_choices=(8, 16))
    buf = run_case(40, 130, [70, 33], "zipf", torch.float32, config={"r_eff": False}, **kw)
    assert buf.shape[3] == 64
    buf = run_case(40, 130, [70, 33], "zipf", torch.float32, config={"rows": True}, **kw)
    assert buf.shape[3] == 64


def test_segment_expand_reads_the_partials_width():
    # the expand reads buf with its own row width: the shrink's 16-wide partials and the same
    # values zero-padded to the pool's 64 give the same y (a kernel that took the pool's width
    # as the row stride would read the wrong rows of the 16-wide buffer)
    gen = torch.Generator().manual_seed(21)
    T, k, outs = 40, 130, [70, 33]
    token_slot = make_token_slot(T, "zipf", 12, gen)
    a, b, ranks, offsets = make_weights(12, outs, 64, k, torch.float32, gen, (8, 16))
    x = torch.randn(T, k, generator=gen)
    meta = build_lora_meta(token_slot).to(DEVICE)
    A, B, pages, boffs = to_paged(a, b, offsets, gen)
    rk = ranks.to(DEVICE)
    buf = lora_shrink(x.to(DEVICE), A, rk, pages, meta, max_rank=16)
    assert buf.shape[3] == 16 and not use_token_path(T, meta)
    wide = torch.nn.functional.pad(buf, (0, 48)).contiguous()
    y0 = torch.randn(T, offsets[-1], generator=gen).to(DEVICE)
    y, y_wide = y0.clone(), y0.clone()
    lora_expand(buf, B, rk, pages, offsets, meta, y, b_offsets=boffs)
    lora_expand(wide, B, rk, pages, offsets, meta, y_wide, b_offsets=boffs)
    assert_close(y, y_wide, torch.float32)
    y_ref = expand_ref(
        shrink_ref(x, a, ranks, meta.to("cpu")), b, ranks, offsets, meta.to("cpu"), y0.cpu()
    )
    assert_close(y, y_ref, torch.float32)
