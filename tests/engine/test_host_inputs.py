"""build_host_inputs against a per-token Python reference: mixed prefill and decode chunks."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model.inputs import build_host_inputs


def test_host_inputs_match_a_per_token_reference():
    rng = random.Random(0)
    bs = 4
    for decode in (True, False):
        chunks = []
        for i in range(9):
            n = 1 if decode or i % 3 else rng.randint(2, 9)
            start = rng.randint(1, 30)
            table = rng.sample(range(100), (start + n - 1) // bs + 1 + rng.randint(0, 2))
            chunks.append(
                SeqChunk(
                    i, [rng.randrange(50) for _ in range(n)], start, table, i % 4 - 1, i % 5 != 0
                )
            )
        h = build_host_inputs(ScheduledBatch(chunks), block_size=bs, max_model_len=64, num_slots=3)
        ids, pos, slot, tok_slot, sample, t = [], [], [], [], [], 0
        for c in chunks:
            for j, tok in enumerate(c.token_ids):
                p = c.start_pos + j
                ids.append(tok), pos.append(p), tok_slot.append(c.adapter_slot)
                slot.append(c.block_table[p // bs] * bs + p % bs)
            t += len(c.token_ids)
            if c.sample:
                sample.append(t - 1)
        mb = max(len(c.block_table) for c in chunks)
        assert h.input_ids.tolist() == ids and h.positions.tolist() == pos
        assert h.slot_mapping.tolist() == slot and h.token_slot.tolist() == tok_slot
        assert h.sample_idx.tolist() == sample
        assert h.block_tables.tolist() == [
            c.block_table + [0] * (mb - len(c.block_table)) for c in chunks
        ]
        assert h.block_tables.dtype == torch.int32 and h.input_ids.dtype == torch.int64
        assert h.context_lens.tolist() == [c.start_pos + len(c.token_ids) for c in chunks]
        assert h.is_decode == ScheduledBatch(chunks).is_decode == decode
        assert h.has_lora and h.max_q_len == max(len(c.token_ids) for c in chunks)


def test_local_group_tables_and_slot_mappings():
    """Sliding-window layer groups: each group's table and slot mapping from the chunk's own
    tables, or derived from its block table (block b in group g at b + (g + 1) * stride)."""
    bs, groups, num_blocks = 4, 2, 300  # stride 100
    own = SeqChunk(0, [5, 6, 7], 5, [3, 9], -1, True, local_tables=[[0, 140], [0, 250]])
    derived = SeqChunk(1, [8], 6, [7, 2], -1, True)
    h = build_host_inputs(
        ScheduledBatch([own, derived]), block_size=bs, max_model_len=64, num_slots=3,
        local_groups=groups, num_blocks=num_blocks,
    )  # fmt: skip
    assert h.local_block_tables is not None and h.local_slot_mapping is not None
    assert h.local_block_tables.tolist() == [[[0, 140], [107, 102]], [[0, 250], [207, 202]]]
    # positions 5, 6, 7 (block 1) and 6 (block 1)
    assert h.local_slot_mapping.tolist() == [
        [140 * 4 + 1, 140 * 4 + 2, 140 * 4 + 3, 102 * 4 + 2],
        [250 * 4 + 1, 250 * 4 + 2, 250 * 4 + 3, 202 * 4 + 2],
    ]
    assert h.slot_mapping.tolist() == [9 * 4 + 1, 9 * 4 + 2, 9 * 4 + 3, 2 * 4 + 2]
    past = SeqChunk(2, [1], 4, [100, 101], -1, True)  # derived ids would reach group 0's 200
    with pytest.raises(ValueError, match="past 99"):
        build_host_inputs(
            ScheduledBatch([past]), block_size=bs, max_model_len=64, num_slots=3,
            local_groups=groups, num_blocks=num_blocks,
        )  # fmt: skip
    plain = build_host_inputs(ScheduledBatch([own]), block_size=bs, max_model_len=64, num_slots=3)
    assert plain.local_block_tables is None and plain.local_slot_mapping is None


def test_local_tables_read_from_local_start_on():
    """Chunks that all carry their own local tables: only each one's entries from its
    ``local_start`` on are read (those before it are given back: zero in the tables), and
    the tables are padded to the longest; the result equals the tables read whole."""
    bs, groups = 4, 2
    chunks = [
        SeqChunk(0, [1], 13, [1, 2, 3, 4], -1, True,
                 local_tables=[[0, 0, 31, 41], [0, 0, 32, 42]], local_start=2),
        SeqChunk(1, [2, 3], 4, [5, 6], -1, True, local_tables=[[51, 61], [52, 62]]),
        SeqChunk(2, [4], 9, [7, 8, 9], -1, True,
                 local_tables=[[0, 81, 91], [0, 82, 92]], local_start=1),
    ]  # fmt: skip
    kw = dict(block_size=bs, max_model_len=64, num_slots=3, local_groups=groups, num_blocks=300)
    h = build_host_inputs(ScheduledBatch(chunks), **kw)
    assert h.local_block_tables is not None and h.local_slot_mapping is not None
    assert h.local_block_tables.dtype == torch.int32
    assert h.local_block_tables.tolist() == [
        [[0, 0, 31, 41], [51, 61, 0, 0], [0, 81, 91, 0]],
        [[0, 0, 32, 42], [52, 62, 0, 0], [0, 82, 92, 0]],
    ]
    # positions 13 (block 3), 4 and 5 (block 1), 9 (block 2)
    assert h.local_slot_mapping.tolist() == [
        [41 * 4 + 1, 61 * 4, 61 * 4 + 1, 91 * 4 + 1],
        [42 * 4 + 1, 62 * 4, 62 * 4 + 1, 92 * 4 + 1],
    ]
    for c in chunks:  # read whole: the same
        c.local_start = 0
    whole = build_host_inputs(ScheduledBatch(chunks), **kw)
    assert torch.equal(whole.local_block_tables, h.local_block_tables)
