"""Embedding requests in LLMEngine over the paged toy runner.

The toy pools a unit vector that is a function of the whole context read back from its
paged pool (tokens and adapter weights), so chunked prefill, the prefix cache, preemption
and adapter slots all show in the vector; :func:`toy_embedding` over the true context says
what it must be.
"""

from __future__ import annotations

import struct

import pytest
import torch

# the engine fixtures of the logic tests (toy runner, async and sync scheduling)
from test_engine_logic import adapter, make_engine, run_all, tok, tokens_of  # noqa: F401
from toy_runner import reference_greedy, toy_embedding

from loraplex.engine.api import Request, RequestOutput, SamplingParams
from loraplex.engine.errors import InvalidRequest, PromptTooLong

HIDDEN = 8  # the toy runner's hidden size


def embed(rid: str, prompt: list[int], ref=None) -> Request:
    return Request(rid, prompt, adapter=ref, task="embed")


def vector(outs: list[RequestOutput]) -> torch.Tensor:
    (last,) = [o for o in outs if o.finished]
    assert last.embedding is not None and len(last.embedding) == 4 * HIDDEN
    assert all(o.embedding is None for o in outs if not o.finished)
    return torch.tensor(struct.unpack(f"<{HIDDEN}f", last.embedding))


def expected(prompt: list[int], weights: int = 0) -> torch.Tensor:
    return toy_embedding([(t, weights) for t in prompt], HIDDEN)


def test_embeddings_in_a_batch_with_generation(make_engine, tmp_path):  # noqa: F811
    """Embeddings (short, chunked, with an adapter) beside generating requests: each gets
    its own vector, the generations their reference tokens, one finished output each."""
    engine = make_engine(max_num_batched_tokens=16)
    ref = adapter(tmp_path, "a", 7)
    prompts = {"e-short": [5, 6, 7], "e-long": list(range(3, 60)), "e-lora": [9, 10, 11, 12]}
    engine.add_request(Request("g", [4, 5, 6], SamplingParams(max_tokens=12, temperature=0.0)))
    engine.add_request(embed("e-short", prompts["e-short"]))
    engine.add_request(embed("e-long", prompts["e-long"]))
    engine.add_request(embed("e-lora", prompts["e-lora"], ref))
    outs = run_all(engine)
    assert torch.allclose(vector(outs["e-short"]), expected(prompts["e-short"]))
    assert torch.allclose(vector(outs["e-long"]), expected(prompts["e-long"]))
    lora = vector(outs["e-lora"])
    assert torch.allclose(lora, expected(prompts["e-lora"], 7))
    assert not torch.allclose(lora, expected(prompts["e-lora"], 0))
    assert tokens_of(outs["g"]) == reference_greedy([4, 5, 6], 0, 12, engine.core.runner.vocab_size)
    for rid in prompts:
        (last,) = outs[rid]
        assert last.finished and last.error is None and last.completion_tokens == 0
        assert last.prompt_tokens == len(prompts[rid])
        assert [d.finish_reason for d in last.deltas] == ["stop"]
    # the long one was prefilled in chunks of the step budget, no chunk sampled
    chunks = [c for b in engine.core.runner.batches for c in b.chunks if c.pool or c.sample]
    assert sum(c.pool for c in chunks) == 3
    assert not any(c.pool and c.sample for c in chunks)


def test_prefix_cache_hit_and_repeat(make_engine):  # noqa: F811
    """The same input twice: the second reuses cached blocks and pools the same vector."""
    engine = make_engine(enable_prefix_caching=True)
    prompt = list(range(3, 30))
    engine.add_request(embed("one", prompt))
    first = run_all(engine)["one"]
    engine.add_request(embed("two", prompt))
    second = run_all(engine)["two"]
    assert second[-1].cached_tokens > 0
    assert torch.allclose(vector(first), vector(second))
    assert torch.allclose(vector(second), expected(prompt))


def test_preempted_embedding_recomputes(make_engine):  # noqa: F811
    """A pool too small for everyone: embeddings get preempted and still come out right."""
    engine = make_engine(num_blocks=12, max_num_batched_tokens=8)
    prompts = {f"e{i}": list(range(3 + i, 3 + i + 15)) for i in range(4)}
    for rid, p in prompts.items():
        engine.add_request(embed(rid, p))
    engine.add_request(Request("g", [4, 5], SamplingParams(max_tokens=20, **{"temperature": 0})))
    outs = run_all(engine)
    for rid, p in prompts.items():
        assert torch.allclose(vector(outs[rid]), expected(p)), rid


def test_abort_embedding(make_engine):  # noqa: F811
    engine = make_engine(max_num_batched_tokens=4)
    engine.add_request(embed("e", list(range(3, 40))))
    engine.step()
    assert engine.abort("e")
    outs = run_all(engine)
    (last,) = [o for o in outs["e"] if o.finished]
    assert last.embedding is None and last.deltas[0].finish_reason == "abort"


def test_embedding_request_errors(make_engine):  # noqa: F811
    engine = make_engine()
    max_len = engine.core.max_model_len
    with pytest.raises(PromptTooLong) as e:
        engine.add_request(embed("long", [5] * (max_len + 1)))
    assert e.value.param == "input"
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(Request("n", [5, 6], SamplingParams(n=2), task="embed"))
    assert e.value.param == "n"
    with pytest.raises(InvalidRequest):
        engine.add_request(embed("empty", []))
    # a whole context's worth is fine for an embedding (nothing is generated after it)
    engine.add_request(embed("full", [5] * max_len))
    assert torch.allclose(vector(run_all(engine)["full"]), expected([5] * max_len))
