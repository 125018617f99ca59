"""Prefill graphs (``prefill_graphs.PrefillGraphs``) on the CPU: the same pieces that a GPU
captures, run eagerly over the same static buffers (``capture=False``), so the split of the
forward around each attention, the padding of a step to its token bucket and the padded
LoRA meta are checked here against transformers + PEFT (fp32) and against the eager path.
On a GPU the pieces are captured and replayed (tests/engine/test_model_runner_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from model_builders import (
    ALL_TARGETS,
    AdapterSpec,
    build_adapter,
    build_hf_model,
    check_batch,
    parity_references,
    prompts_for,
    runner_for,
)

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model.inputs import build_host_inputs
from loraplex.engine.model.prefill_graphs import PrefillGraphs, lora_widths, prefill_buckets

SPECS = [
    AdapterSpec(rank=4, targets=("q_proj", "k_proj"), alpha=8, seed=1),
    AdapterSpec(rank=16, targets=tuple(ALL_TARGETS), alpha=32, rslora=True, seed=2),
    AdapterSpec(rank=32, targets=("v_proj", "o_proj", "up_proj", "down_proj"), seed=3),
]


def counting(pg: PrefillGraphs) -> list[tuple[int, int]]:
    """Record the key of every step ``pg`` runs."""
    keys: list[tuple[int, int]] = []
    run = pg.run

    def counted(host, key, *args, **kwargs):
        keys.append(key)
        return run(host, key, *args, **kwargs)

    pg.run = counted  # type: ignore[method-assign]
    return keys


def test_buckets_and_widths():
    assert prefill_buckets(1024) == [16, 32, 64, *range(128, 1025, 128)]
    assert prefill_buckets(48) == [16, 32, 48]
    assert prefill_buckets(300) == [16, 32, 64, 128, 256, 304]
    assert prefill_buckets(1) == [16]
    assert lora_widths(64) == [16, 32, 64]
    assert lora_widths(16) == [16]
    assert lora_widths(8) == [8]


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def family(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"prefill-graphs-{kind}")
    base = build_hf_model(root / "base", kind, seed=5)
    adapters = [build_adapter(base, root / f"lora{i}", s) for i, s in enumerate(SPECS)]
    return kind, base, adapters


def test_prefill_graphs_match_transformers(family):
    """The base and three adapters in one batch (a two-chunk prefill, then decode steps):
    both prefill steps run the pieces, padded (12 tokens in the 16 bucket, 31 in 32), with
    logits within the parity tolerance of transformers + PEFT and the same greedy tokens."""
    kind, base, adapters = family
    prompts = prompts_for(4, 320, seed=1)
    refs = parity_references(base, adapters, prompts)
    runner = runner_for(str(base))
    runner.prefill_graphs = PrefillGraphs(
        runner.model, runner.kv_caches, runner.lora, max_tokens=48, capture=False
    )
    keys = counting(runner.prefill_graphs)
    check_batch(runner, adapters, prompts, refs, greedy=True)
    assert keys == [(16, 32), (32, 32)], kind  # widest adapter: rank 32


def mixed_batch(runner, slots: list[int]) -> ScheduledBatch:
    """Sequence i prefills 5 + 2i tokens with ``slots[i]``, except sequence 0, which decodes
    one token after a 6-token prefix it wrote first."""
    g = torch.Generator().manual_seed(7)
    chunks = []
    for i, slot in enumerate(slots):
        n = 1 if i == 0 else 5 + 2 * i
        table = [i * 4 + b for b in range(4)]
        start = 6 if i == 0 else 0
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        chunks.append(SeqChunk(i, ids, start, table, slot, True))
    return ScheduledBatch(chunks)


def test_mixed_step_same_as_eager(family):
    """A step mixing a decode token with prefill chunks of three adapters and the base gives
    the eager forward's logits; with the same step's adapters cleared from the slots the
    logits move (the comparison is sharp)."""
    _, base, adapters = family
    runner = runner_for(str(base))
    for slot, path in enumerate(adapters):
        runner.write_slot(slot, runner.read_adapter(path))
    prefix = ScheduledBatch([SeqChunk(0, list(range(10, 16)), 0, [0, 1, 2, 3], 1, False)])
    runner.execute(prefix)
    batch = mixed_batch(runner, [1, 0, -1, 2, 1])
    eager = runner.execute(batch)
    runner.prefill_graphs = PrefillGraphs(
        runner.model, runner.kv_caches, runner.lora, max_tokens=128, capture=False
    )
    keys = counting(runner.prefill_graphs)
    graphed = runner.execute(batch)
    assert keys == [(64, 32)]  # 1 + 7 + 9 + 11 + 13 = 41 tokens
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    runner.clear_slot(2)
    assert (runner.execute(batch) - eager).abs().max() > 1e-3


def test_key_picks_a_bucket_that_holds_the_step(family):
    _, base, adapters = family
    runner = runner_for(str(base), max_loras=4)
    runner.write_slot(0, runner.read_adapter(adapters[0]))  # rank 4
    runner.write_slot(1, runner.read_adapter(adapters[1]))  # rank 16
    runner.write_slot(2, runner.read_adapter(adapters[1]))
    runner.write_slot(3, runner.read_adapter(adapters[2]))  # rank 32
    pg = PrefillGraphs(runner.model, runner.kv_caches, runner.lora, max_tokens=48, capture=False)

    def key(chunks: list[SeqChunk]):
        host = build_host_inputs(
            ScheduledBatch(chunks), block_size=4, max_model_len=64, num_slots=runner.num_slots
        )
        slots = {c.adapter_slot for c in chunks}
        rank = max(runner.lora.ranks_used(slots).values(), default=0)
        return pg.key(host, len(slots - {-1}), rank)

    def prefill(i: int, n: int, slot: int) -> SeqChunk:
        return SeqChunk(i, [5] * n, 0, [i * 13 + b for b in range(-(-n // 4))], slot, True)

    assert key([prefill(0, 10, -1)]) == (16, 0)
    assert key([prefill(0, 10, 0)]) == (16, 16)  # rank 4 -> the narrowest width
    assert key([prefill(0, 10, 1), prefill(1, 4, 3)]) == (16, 32)
    # three distinct adapters over 6 tokens: 16 tokens pad to 8 segments, enough
    assert key([prefill(i, 2, s) for i, s in enumerate((0, 1, 2))]) == (16, 16)
    assert key([prefill(0, 49, -1)]) is None  # past the largest bucket: eager
    decode = [SeqChunk(i, [5], 3, [i * 4], i, True) for i in range(3)]
    assert key(decode) is None  # the decode graphs' steps

    # a pool of 32 slots: a 16-token step holds at most 8 distinct adapters, so 9 take 32
    runner = runner_for(str(base), max_loras=32)
    for s in range(9):
        runner.write_slot(s, runner.read_adapter(adapters[1]))
    pg = PrefillGraphs(runner.model, runner.kv_caches, runner.lora, max_tokens=48, capture=False)
    assert key([prefill(i, 1, s) for i, s in enumerate(range(8))] + [prefill(8, 4, 0)]) == (
        16,
        16,
    )
    assert key([prefill(i, 1, s) for i, s in enumerate(range(9))]) == (32, 16)
