"""Scheduler from ints: budgets, chunked prefill, preemption, adapters, no starvation."""

from __future__ import annotations

import itertools

import pytest

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.lora.slots import SlotTable
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.engine.sequence import SeqStatus, Sequence

_ids = itertools.count()


def make_seq(n_prompt: int, adapter: str | None = None, base: int = 0) -> Sequence:
    i = next(_ids)
    toks = [base + t for t in range(n_prompt)]
    return Sequence(i, f"r{i}", 0, i, toks, n_prompt, adapter_key=adapter)


def make_sched(num_blocks=16, block_size=4, max_seqs=8, budget=64, slots=2, aging=4, prefix=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(
        bm,
        SlotTable.slots_only(slots),
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        aging_steps=aging,
    )


def always(_key: str) -> bool:
    return True


def run_step(s: Scheduler, out: SchedulerOutput, new_token: int = 7) -> None:
    """What the engine does after the runner: advance, append a token where sampled."""
    s.advance(out)
    for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
        if chunk.sample:
            seq.token_ids.append(new_token)


def drain(s: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        s.finish(seq)
    assert s.blocks.is_whole() and s.slots.is_idle()


def test_prefill_then_decode():
    s = make_sched()
    a, b = make_seq(5), make_seq(3)
    s.add(a)
    s.add(b)
    out = s.schedule(always)
    assert [len(c.token_ids) for c in out.batch.chunks] == [5, 3]
    assert all(c.sample and c.start_pos == 0 for c in out.batch.chunks)
    run_step(s, out)
    out = s.schedule(always)
    assert out.batch.is_decode and [c.start_pos for c in out.batch.chunks] == [5, 3]
    assert out.batch.chunks[0].token_ids == [7]
    drain(s, a, b)


def test_chunked_prefill_respects_budget():
    s = make_sched(budget=4)
    a = make_seq(10)
    s.add(a)
    starts = []
    while True:
        out = s.schedule(always)
        assert out.batch.num_tokens <= 4
        c = out.batch.chunks[0]
        starts.append(c.start_pos)
        run_step(s, out)
        if c.sample:
            break
    assert starts == [0, 4, 8]
    drain(s, a)


def test_decodes_go_before_new_prefills():
    s = make_sched(budget=6)
    a = make_seq(4)
    s.add(a)
    run_step(s, s.schedule(always))
    b = make_seq(20)
    s.add(b)
    out = s.schedule(always)
    assert [len(c.token_ids) for c in out.batch.chunks] == [1, 5]
    assert out.batch.chunks[1].sample is False
    drain(s, a, b)


def test_max_num_seqs_caps_running():
    s = make_sched(max_seqs=2)
    seqs = [make_seq(2) for _ in range(3)]
    for q in seqs:
        s.add(q)
    out = s.schedule(always)
    assert len(out.seqs) == 2 and len(s.waiting) == 1
    drain(s, *seqs)


def test_preempts_newest_when_blocks_run_out():
    s = make_sched(num_blocks=4, block_size=2, prefix=False)
    a, b = make_seq(4), make_seq(4, base=10)
    s.add(a)
    s.add(b)
    run_step(s, s.schedule(always))  # 2 blocks each: the pool is full
    out = s.schedule(always)  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b] and [q.seq_id for q in out.seqs] == [a.seq_id]
    assert b.status is SeqStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.num_preemptions == 1
    run_step(s, out)
    s.finish(a)
    out = s.schedule(always)  # b recomputes prompt + the token it had generated
    assert out.seqs == [b] and out.batch.chunks[0].token_ids == [10, 11, 12, 13, 7]
    drain(s, b)


def test_lone_sequence_preempts_itself_rather_than_deadlock():
    s = make_sched(num_blocks=2, block_size=2)
    a = make_seq(4)
    s.add(a)
    run_step(s, s.schedule(always))
    out = s.schedule(always)
    assert out.preempted == [a] and out.is_empty
    assert s.schedule(always).is_empty  # 5 tokens never fit 2 blocks of 2: the engine refuses such
    drain(s, a)


def test_adapter_cap_and_slot_writes():
    s = make_sched(slots=2)
    seqs = [make_seq(2, adapter=k) for k in ("x", "y", "z", "x")]
    seqs.append(make_seq(2))
    for q in seqs:
        s.add(q)
    out = s.schedule(always)
    assert sorted(k for _, k in out.slot_writes) == ["x", "y"]
    assert [q.adapter_key for q in out.seqs] == ["x", "y", "x", None]  # z waits for a slot
    assert len({c.adapter_slot for c in out.batch.chunks if c.adapter_slot >= 0}) == 2
    slot_x = s.slots.lookup("x")
    assert all(
        c.adapter_slot == slot_x
        for c, q in zip(out.batch.chunks, out.seqs, strict=True)
        if q.adapter_key == "x"
    )
    run_step(s, out)
    s.finish(seqs[1])  # y done: its slot is unpinned and goes to z
    out = s.schedule(always)
    assert out.slot_writes == [(s.slots.lookup("z"), "z")] and out.evicted == ["y"]
    drain(s, *seqs)


def test_loading_adapter_does_not_hold_up_others():
    s = make_sched()
    cold, warm = make_seq(3, adapter="cold"), make_seq(3)
    s.add(cold)
    s.add(warm)
    out = s.schedule(lambda k: k != "cold")
    assert out.seqs == [warm] and list(s.waiting) == [cold]
    run_step(s, out)
    out = s.schedule(always)
    assert cold in out.seqs and out.slot_writes == [(0, "cold")]
    drain(s, cold, warm)


def test_aging_stops_starvation_by_slot_pressure():
    s = make_sched(slots=1, aging=3, max_seqs=8)
    holder = make_seq(2, adapter="hot")
    s.add(holder)
    run_step(s, s.schedule(always))
    starved = make_seq(2, adapter="cold")
    s.add(starved)
    late = []
    for step in range(6):
        q = make_seq(2, adapter="hot")
        late.append(q)
        s.add(q)
        out = s.schedule(always)
        run_step(s, out)
        if step >= 2:  # aged: nothing behind the starved request is admitted any more
            assert q.status is SeqStatus.WAITING
    for q in [holder, *late]:
        if q.status is SeqStatus.RUNNING:
            s.finish(q)
    out = s.schedule(always)
    assert out.seqs[0] is starved
    drain(s, starved, *late)


def test_block_shortage_keeps_fcfs_order():
    s = make_sched(num_blocks=4, block_size=2)
    big, small = make_seq(8), make_seq(2)
    s.add(make_seq(6, base=100))
    first = s.waiting[0]
    run_step(s, s.schedule(always))  # first holds 3 of 4 blocks
    s.add(big)
    s.add(small)
    out = s.schedule(always)
    assert small not in out.seqs  # does not overtake big, which waits for blocks
    drain(s, first, big, small)


def test_prefix_hit_on_admission():
    s = make_sched()
    a = make_seq(9)
    s.add(a)
    run_step(s, s.schedule(always))
    b = make_seq(9)
    s.add(b)
    out = s.schedule(always)
    chunk = out.batch.chunks[out.seqs.index(b)]
    assert b.num_cached_tokens == 8 and chunk.start_pos == 8 and chunk.token_ids == [8]
    assert chunk.block_table[:2] == a.block_table[:2]
    drain(s, a, b)


@pytest.mark.parametrize("prefix", [True, False])
def test_forked_child_shares_parent_blocks(prefix):
    s = make_sched(prefix=prefix)
    parent = make_seq(10)
    s.add(parent)
    run_step(s, s.schedule(always))
    child = Sequence(next(_ids), parent.request_id, 1, parent.arrival, list(range(10)), 10)
    s.blocks.fork(parent, child)
    s.add_front(child)
    out = s.schedule(always)
    chunk = out.batch.chunks[out.seqs.index(child)]
    assert chunk.start_pos == 8 and chunk.token_ids == [8, 9] and chunk.sample
    drain(s, parent, child)


def test_abort_while_waiting_returns_blocks():
    s = make_sched()
    a = make_seq(3)
    s.add(a)
    s.finish(a)
    assert not s.has_work()
    drain(s)


def test_waiting_forks_give_up_blocks_rather_than_deadlock():
    s = make_sched(num_blocks=4, block_size=2, prefix=False)
    parent = make_seq(5)
    s.add(parent)
    run_step(s, s.schedule(always))  # parent: 3 blocks
    child = Sequence(next(_ids), parent.request_id, 1, parent.arrival, list(range(5)), 5)
    s.blocks.fork(parent, child)  # the child holds 2 of them while it waits
    s.add(child)
    s.finish(parent)
    big = make_seq(8, base=50)
    s.add_front(big)  # needs every block; nothing runs that could free any
    out = s.schedule(always)
    assert out.seqs == [big] and child.block_table == [] and child.num_computed_tokens == 0
    drain(s, big, child)
