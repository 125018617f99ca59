"""Block manager from ints: ref counts, free list, prefix cache keyed by adapter."""

from __future__ import annotations

import itertools

import pytest

from loraplex.engine.block_manager import BlockManager
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
