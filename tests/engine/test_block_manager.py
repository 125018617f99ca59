"""Block manager from ints: ref counts, free list, prefix cache keyed by adapter."""

from __future__ import annotations

import itertools

import pytest

from loraplex.engine.block_manager import (
    UNBOUNDED_TOKENS,
    BlockManager,
    LocalBlocks,
    WindowedBlocks,
)
from loraplex.engine.sequence import Sequence

_ids = itertools.count()


def make_seq(tokens: list[int], adapter: str | None = None) -> Sequence:
    i = next(_ids)
    return Sequence(i, f"r{i}", 0, i, list(tokens), len(tokens), adapter_key=adapter)


@pytest.fixture
def bm():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    yield manager
    assert manager.is_whole(), "KV pool leaked blocks"


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    bm.admit(seq)
    bm.grow(seq, seq.num_uncomputed)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_grow_and_free_return_every_block(bm):
    seq = make_seq(list(range(10)))
    bm.admit(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    bm.grow(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free == 5
    seq.num_computed_tokens = 10
    bm.grow(seq, 2)  # 12 tokens fit in 3 blocks
    assert len(seq.block_table) == 3
    bm.grow(seq, 3)
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free == 8


def test_cannot_grow_past_the_pool(bm):
    seq = make_seq(list(range(40)))
    assert not bm.can_grow(seq, 33)
    assert bm.can_grow(seq, 32)
    with pytest.raises(RuntimeError):
        bm.grow(seq, 33)


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(12)))
    run_prefill(bm, a)
    b = make_seq([*range(12), 99])
    bm.admit(b)
    assert b.block_table == a.block_table and b.num_cached_tokens == 12
    c = make_seq(list(range(12)))  # exactly the cached prompt: last block recomputed
    bm.admit(c)
    assert c.block_table == a.block_table[:2] and c.num_computed_tokens == 8
    for s in (a, b, c):
        bm.free(s)
    assert bm.is_whole()


def test_prefix_cache_never_crosses_adapters(bm):
    a = make_seq(list(range(9)), adapter="lora-v1")
    run_prefill(bm, a)
    for other in ("lora-v2", None):
        s = make_seq(list(range(9)), adapter=other)
        bm.admit(s)
        assert s.num_cached_tokens == 0
        bm.free(s)
    same = make_seq(list(range(9)), adapter="lora-v1")
    bm.admit(same)
    assert same.num_cached_tokens == 8
    bm.free(same)
    bm.free(a)


def test_freed_blocks_are_revived_until_reused(bm):
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free == 8
    b = make_seq(list(range(9)))
    assert bm.can_admit(b, budget=1)
    bm.admit(b)
    assert b.num_cached_tokens == 8 and bm.num_free == 6
    bm.free(b)
    # fill the pool with other tokens: the cached blocks get handed out and forgotten
    c = make_seq([1000 + i for i in range(32)])
    bm.admit(c)
    bm.grow(c, 32)
    bm.free(c)
    d = make_seq(list(range(9)))
    bm.admit(d)
    assert d.num_cached_tokens == 0
    bm.free(d)


def test_uncomputed_blocks_are_not_offered(bm):
    a = make_seq(list(range(12)))
    bm.admit(a)
    bm.grow(a, 12)
    a.num_computed_tokens = 4  # a chunked prefill has done the first block only
    bm.commit(a)
    b = make_seq([*range(12), 5])
    bm.admit(b)
    assert b.num_cached_tokens == 4
    bm.free(b)
    bm.free(a)


def test_fork_shares_full_prompt_blocks(bm):
    parent = make_seq(list(range(10)))
    run_prefill(bm, parent)
    child = make_seq(list(range(10)))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    bm.free(parent)
    assert bm.num_free == 6  # the shared blocks are still the child's
    bm.free(child)


def test_disabled_prefix_cache_never_hits():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    run_prefill(bm, a)
    b = make_seq([1, 2, 3, 4, 5])
    bm.admit(b)
    assert b.num_cached_tokens == 0
    bm.free(a)
    bm.free(b)
    assert bm.is_whole()


# -- a model with sliding-window layers: their groups' tables over the same pool --------------


@pytest.fixture
def wb():
    """Window 6 over blocks of 4: a query at p reads the local blocks from (p - 5) // 4 on."""
    manager = WindowedBlocks(32, block_size=4, window=6, groups=1, enable_prefix_caching=True)
    yield manager
    assert manager.is_whole(), "KV pool leaked blocks"


def step(wb: WindowedBlocks, seq: Sequence, n: int) -> None:
    """Schedule and run ``n`` tokens of ``seq`` (its blocks admitted already)."""
    assert wb.grow_if_fits(seq, n)
    seq.num_computed_tokens += n
    wb.commit(seq)


def live(seq: Sequence, group: int = 0) -> list[int]:
    return seq.local_tables[group][seq.local_start :]


@pytest.mark.parametrize("groups", [1, 5])
def test_local_blocks_behind_the_window_go_back(groups):
    wb = WindowedBlocks(64, block_size=4, window=6, groups=groups, enable_prefix_caching=True)
    seq = make_seq(list(range(10)))
    wb.admit(seq)
    step(wb, seq, 10)  # the next query, at 10, reads positions 5..10: blocks 1, 2
    assert len(seq.block_table) == 3 and [len(t) for t in seq.local_tables] == [3] * groups
    assert seq.local_start == 1 and all(t[0] == 0 for t in seq.local_tables)
    assert wb.num_free == 64 - 3 - 2 * groups == 64 - wb.held(seq)
    for _ in range(30):  # decode: the full table grows, the local ones keep two or three
        seq.token_ids.append(7)
        step(wb, seq, 1)
        p = seq.num_computed_tokens
        assert seq.local_start == (p - 5) // 4
        assert len(live(seq)) == len(seq.block_table) - seq.local_start <= 3
    assert len(seq.block_table) == 10 and wb.num_free == 64 - 10 - 2 * groups
    ids = seq.block_table + [b for t in seq.local_tables for b in t[seq.local_start :]]
    assert len(set(ids)) == len(ids)  # every group's blocks its own
    wb.free(seq)
    assert seq.local_tables == [] and seq.local_start == 0 and wb.is_whole()


def test_blocks_given_back_serve_any_group():
    wb = WindowedBlocks(16, block_size=4, window=6, groups=1, enable_prefix_caching=True)
    a = make_seq(list(range(24)))
    assert wb.can_admit(a, budget=24)  # 6 full + 6 local blocks
    assert not wb.can_admit(make_seq(list(range(36))), budget=36)  # 9 + 9
    wb.admit(a)
    step(wb, a, 24)  # 4 local blocks go back: a holds 6 + 2
    assert wb.held(a) == 8 and wb.num_free == 8
    b = make_seq([100 + i for i in range(20)])
    assert wb.can_admit(b, budget=16) and not wb.can_admit(b, budget=17)
    wb.admit(b)
    assert wb.can_grow(b, 16) and not wb.can_grow(b, 17)
    assert wb.grow_if_fits(b, 16) and wb.num_free == 0  # its full blocks among a's old ones
    for s in (a, b):
        wb.free(s)
    assert wb.is_whole()


def test_windowed_prefix_hit_needs_the_local_window_cached(wb):
    a = make_seq(list(range(17)))
    wb.admit(a)
    assert wb.grow_if_fits(a, 17)
    local = list(a.local_tables[0])
    a.num_computed_tokens = 17
    wb.commit(a)  # a query at 17 reads positions 12..17: local blocks 0..2 given back
    assert a.local_start == 3 and a.local_tables[0][:3] == [0, 0, 0]
    b = make_seq([*range(17), 99])
    wb.admit(b)  # 4 full blocks hit; a query at 16 reads local blocks 2 (revived) and 3
    assert b.num_cached_tokens == 16 and b.block_table == a.block_table[:4]
    assert b.local_start == 2 and live(b) == local[2:4]
    wb.free(b)
    wb.free(a)
    c = make_seq([500 + i for i in range(64)])  # takes every block: the hashes go
    wb.admit(c)
    assert wb.grow_if_fits(c, 64)
    wb.free(c)
    d = make_seq([*range(17), 99])
    wb.admit(d)
    assert d.num_cached_tokens == 0 and d.block_table == [] and live(d) == []
    wb.free(d)


def test_windowed_prefix_hit_cut_to_what_the_local_groups_hold():
    wb = WindowedBlocks(40, block_size=4, window=5, groups=1, enable_prefix_caching=True)
    a = make_seq(list(range(32)))
    wb.admit(a)
    for _ in range(4):
        step(wb, a, 8)  # each step gives back the local blocks behind the window
    wb.free(a)
    # the pool hands out blocks never used first, then the oldest given back: a's local
    # blocks 0..5 (given back during its run) go before its last local ones and its full ones
    filler = make_seq([900 + i for i in range(60)])
    wb.admit(filler)
    assert wb.grow_if_fits(filler, 60) and wb.num_free == 10
    b = make_seq([*range(32), 1])
    wb.admit(b)  # a query at 32 reads positions 28..32: local block 7, still cached
    assert b.num_cached_tokens == 32 and b.local_start == 7
    wb.free(b)
    c = make_seq([*range(25), 1])
    assert len(BlockManager.match_prefix(wb, c)) == 6  # the full layers' blocks are there
    wb.admit(c)  # but each prefix's window needs one of local blocks 0..5: no hit
    assert c.num_cached_tokens == 0 and c.block_table == []
    for s in (c, filler):
        wb.free(s)
    assert wb.is_whole()


def test_windowed_fork_needs_the_parent_to_hold_its_prompt(wb):
    held = make_seq(list(range(14)))
    held.hold_local = True
    wb.admit(held)
    step(wb, held, 14)
    assert held.local_start == 0 and len(live(held)) == 4  # nothing given back
    child = make_seq(list(range(14)))
    wb.fork(held, child)  # 3 full blocks; a query at 12 reads local blocks 1, 2
    assert child.block_table == held.block_table[:3] and child.num_computed_tokens == 12
    assert child.local_start == 1 and live(child) == held.local_tables[0][1:3]
    free = wb.num_free
    held.hold_local = False
    held.token_ids.append(5)
    step(wb, held, 1)  # the parent gives back blocks 0 and 1; 1 is still the child's
    assert held.local_start == 2 and wb.num_free == free + 1
    late = make_seq(list(range(14)))
    wb.fork(held, late)  # the parent no longer holds local block 1: nothing to share
    assert late.block_table == [] and late.num_computed_tokens == 0
    for s in (held, child, late):
        wb.free(s)


def test_windowed_disabled_prefix_cache_still_gives_blocks_back():
    wb = WindowedBlocks(16, block_size=2, window=3, groups=1, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    wb.admit(a)
    step(wb, a, 9)  # a query at 9 reads positions 7..9: blocks 3, 4
    assert a.local_start == 3 and wb.num_free == 16 - 5 - 2
    b = make_seq(list(range(9)))
    wb.admit(b)
    assert b.num_cached_tokens == 0
    for s in (a, b):
        wb.free(s)
    assert wb.is_whole()


# -- every layer local: one table that gives its blocks back ------------------------------------


def test_local_table_gives_back_and_holds_a_window():
    lb = LocalBlocks(8, block_size=4, window=6, enable_prefix_caching=True)
    seq = make_seq(list(range(10)))
    lb.admit(seq)
    step(lb, seq, 10)  # the next query, at 10, reads blocks 1 and 2
    assert seq.local_start == 1 and seq.block_table[0] == 0 and lb.num_free == 6
    for _ in range(60):  # 70 tokens: 18 blocks of table, never more than 3 held
        seq.token_ids.append(7)
        step(lb, seq, 1)
        assert lb.held(seq) == len(seq.block_table) - seq.local_start <= 3
    assert len(seq.block_table) == 18 and lb.capacity_tokens(4) == UNBOUNDED_TOKENS
    lb.free(seq)
    assert lb.is_whole() and seq.block_table == []


def test_local_table_prefix_hit_needs_only_the_last_window():
    lb = LocalBlocks(16, block_size=4, window=5, enable_prefix_caching=True)
    a = make_seq(list(range(32)))
    lb.admit(a)
    for _ in range(4):
        step(lb, a, 8)
    lb.free(a)
    # the filler takes the 8 blocks never used, then a's blocks 0..3 (given back first)
    filler = make_seq([900 + i for i in range(48)])
    lb.admit(filler)
    assert lb.grow_if_fits(filler, 48) and lb.num_free == 4
    b = make_seq([*range(32), 1])
    lb.admit(b)  # a query at 32 reads block 7 only: all 32 tokens hit
    assert b.num_cached_tokens == 32 and b.local_start == 7 and b.block_table[:7] == [0] * 7
    c = make_seq([*range(25), 1])
    lb.admit(c)  # a query at 24 reads block 5 (still cached): 24 tokens hit
    assert c.num_cached_tokens == 24 and c.local_start == 5
    d = make_seq([*range(17), 1])
    lb.admit(d)  # each prefix of at most 4 blocks needs one of blocks 0..3: no hit
    assert d.num_cached_tokens == 0 and d.block_table == []
    for s in (b, c, d, filler):
        lb.free(s)
    assert lb.is_whole()


def test_local_table_fork_and_disabled_cache():
    lb = LocalBlocks(16, block_size=4, window=6, enable_prefix_caching=False)
    parent = make_seq(list(range(14)))
    parent.hold_local = True
    lb.admit(parent)
    step(lb, parent, 14)
    child = make_seq(list(range(14)))
    lb.fork(parent, child)  # a query at 12 reads blocks 1, 2
    assert child.local_start == 1 and child.block_table == [0, *parent.block_table[1:3]]
    parent.hold_local = False
    parent.token_ids.append(3)
    step(lb, parent, 1)
    again = make_seq(list(range(14)))
    assert lb.match_prefix(again) == [] and again.num_cached_tokens == 0
    for s in (parent, child):
        lb.free(s)
    assert lb.is_whole()
