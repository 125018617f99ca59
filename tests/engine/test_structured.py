"""Structured outputs in the engine (constrained decoding with llguidance), on the tiny Llama.

Constrained requests share batches with unconstrained ones and with adapters; each
constrained output must parse and validate against its schema (``jsonschema``), and an
unconstrained request beside them must generate exactly what it generates alone. The
schemas come from ``benchmarks/json_schemas.py`` with ``max_tokens`` above the bound on a
valid value's size, so every constrained output must end with ``stop``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import jsonschema
import llguidance
import msgspec
import pytest
import torch

from loraplex.engine.api import AdapterRef, Grammar, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import InvalidRequest
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.offline import OfflineEngine
from loraplex.engine.token_mask import MaskBatch, apply_token_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from json_schemas import max_output_bytes, random_schema

CONFIG = EngineConfig(num_gpu_blocks=256, max_num_seqs=32, enable_prefix_caching=False)


def _engine(model: Path) -> OfflineEngine:
    return OfflineEngine(LLMEngine.from_model(str(model), CONFIG))


def run(engine: OfflineEngine, requests: list[Request]) -> dict[str, dict]:
    """Every request to its end: per request id, per choice, text and finish reason."""
    for r in requests:
        engine.add_request(r)
    got: dict[str, dict] = {
        r.request_id: {"text": {}, "finish": {}, "error": None} for r in requests
    }
    while engine.has_unfinished():
        for out in engine.step():
            g = got[out.request_id]
            for d in out.deltas:
                g["text"][d.index] = g["text"].get(d.index, "") + d.text
                if d.finish_reason is not None:
                    g["finish"][d.index] = d.finish_reason
            if out.exception is not None:
                g["error"] = out.exception
    return got


def schema_request(rid: str, schema: dict, adapter: AdapterRef | None = None, **kw) -> Request:
    p = SamplingParams(
        max_tokens=max_output_bytes(schema) + 1,
        temperature=kw.pop("temperature", 1.0),
        seed=kw.pop("seed", 0),
        grammar=Grammar("json_schema", json.dumps(schema)),
        **kw,
    )
    return Request(rid, "Some JSON please:", p, adapter)


def small_schemas(count: int, seed: int, limit: int = 120) -> list[dict]:
    """Schemas whose longest valid value fits the tiny model's context beside the prompt."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < count:
        s = random_schema(rng, depth=1)
        if max_output_bytes(s) <= limit:
            out.append(s)
    return out


def test_masks_touch_only_their_rows() -> None:
    vocab = 70  # wider than the 2-word bitmask: ids 64..69 are never allowed
    logits = torch.randn(4, vocab)
    allowed = {1: [0, 5, 31, 32, 63], 3: [7]}
    bitmask = torch.zeros(2, 2, dtype=torch.int64)
    for line, row in enumerate((1, 3)):
        for t in allowed[row]:
            bitmask[line, t // 32] |= 1 << (t % 32)
    bitmask = bitmask.to(torch.int32)  # two's complement: bit 31 is the sign bit
    out = apply_token_masks(logits, MaskBatch([1, 3], bitmask))
    for row in (0, 2):
        assert torch.equal(out[row], logits[row])
    for row, ids in allowed.items():
        keep = torch.full((vocab,), float("-inf"))
        keep[ids] = logits[row, ids]
        assert torch.equal(out[row], keep)


def test_mixed_batch_outputs_validate_and_leave_neighbours_alone(tiny_model, tiny_adapters):
    refs = [AdapterRef(name, str(path)) for name, path in tiny_adapters.items()]
    schemas = small_schemas(10, seed=3)
    constrained = [
        schema_request(f"s{i}", s, refs[i % len(refs)] if i % 3 else None, seed=i)
        for i, s in enumerate(schemas)
    ]
    constrained.append(
        Request(
            "obj",
            "An object:",
            SamplingParams(max_tokens=60, temperature=0.0, grammar=Grammar("json_object")),
        )
    )
    free = [
        Request(
            f"free{i}",
            f"Plain text {i}",
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            refs[i] if i else None,
        )
        for i in range(3)
    ]
    mixed = run(_engine(tiny_model), [*constrained, *free])
    for r in constrained[:-1]:
        g = mixed[r.request_id]
        assert g["error"] is None and g["finish"] == {0: "stop"}, (r.request_id, g)
        value = json.loads(g["text"][0])
        jsonschema.validate(value, json.loads(r.sampling.grammar.spec))
    obj = mixed["obj"]
    assert obj["finish"] == {0: "stop"} or obj["finish"] == {0: "length"}
    if obj["finish"][0] == "stop":
        assert isinstance(json.loads(obj["text"][0]), dict)
    alone = run(_engine(tiny_model), free)
    for r in free:
        assert mixed[r.request_id]["text"] == alone[r.request_id]["text"]


def test_each_request_ends_once(tiny_model, tiny_adapters):
    """At the engine's own boundary (no output processor to hide a repeat): a request's
    tokens come once and nothing follows its finished output, with constrained requests
    (whose steps read the step in flight early) beside unconstrained ones."""
    engine = LLMEngine.from_model(str(tiny_model), CONFIG)
    ref = AdapterRef("a", str(next(iter(tiny_adapters.values()))))
    reqs = [schema_request(f"s{i}", s, ref if i % 2 else None, seed=i)
            for i, s in enumerate(small_schemas(4, seed=9))]  # fmt: skip
    reqs += [
        Request(f"f{i}", [5, 6, 7 + i], SamplingParams(max_tokens=6 + i, ignore_eos=True))
        for i in range(3)
    ]
    for r in reqs:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    done: set[str] = set()
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in done, f"output after the end: {out}"
            tokens[out.request_id] += [t for c in out.choices for t in c.token_ids]
            if out.finished:
                done.add(out.request_id)
    assert done == set(tokens)
    tok = engine.tokenizer
    for r in reqs[:4]:
        text = tok.decode(tokens[r.request_id], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), json.loads(r.sampling.grammar.spec))
    for i, r in enumerate(reqs[4:]):
        assert len(tokens[r.request_id]) == 6 + i


def test_every_choice_follows_the_grammar(tiny_model):
    schema = small_schemas(1, seed=8)[0]
    r = schema_request("n", schema, n=3, seed=5)
    got = run(_engine(tiny_model), [r])["n"]
    assert got["finish"] == {0: "stop", 1: "stop", 2: "stop"}
    for text in got["text"].values():
        jsonschema.validate(json.loads(text), schema)


def test_unsupported_schema_fails_its_request_alone(tiny_model):
    bad = Request(
        "bad",
        "x",
        SamplingParams(
            max_tokens=8,
            grammar=Grammar("json_schema", json.dumps({"type": "array", "uniqueItems": True})),
        ),
    )
    good = schema_request("good", small_schemas(1, seed=1)[0])
    got = run(_engine(tiny_model), [bad, good])
    err = got["bad"]["error"]
    assert isinstance(err, InvalidRequest) and err.param == "response_format"
    assert "uniqueItems" in err.message
    assert got["good"]["finish"] == {0: "stop"}


def test_max_tokens_cuts_a_constrained_output_at_a_valid_prefix(tiny_model):
    """As at OpenAI: ``length``, and the text is incomplete JSON, but a prefix the grammar
    allows (checked token by token with a fresh matcher of the same grammar)."""
    engine = _engine(tiny_model)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}},
        "required": ["name"],
        "additionalProperties": False,
    }
    r = schema_request("cut", schema, temperature=1.0)
    r.sampling = SamplingParams(max_tokens=4, seed=2, grammar=r.sampling.grammar)
    engine.add_request(r)
    ids: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            ids += [t for d in out.deltas for t in d.token_ids]
            if out.finished:
                assert out.deltas[-1].finish_reason == "length"
    assert len(ids) == 4
    template = engine.core.grammars.get(r.sampling.grammar).result()
    fresh = template.deep_copy()
    assert fresh.validate_tokens(ids) == len(ids)
    assert not fresh.is_error()
    with pytest.raises(json.JSONDecodeError):
        json.loads(engine.core.tokenizer.decode(ids))


def test_grammars_compile_once_per_schema(tiny_model):
    engine = _engine(tiny_model)
    schema = small_schemas(1, seed=4)[0]
    reqs = [schema_request(f"r{i}", schema, seed=i) for i in range(4)]
    got = run(engine, reqs)
    assert all(g["finish"] == {0: "stop"} for g in got.values())
    stats = engine.stats()
    assert stats.grammar_compiles == 1 and stats.grammar_cache_hits == 3
    assert stats.grammar_mask_rows > 0 and stats.grammar_mask_ms > 0


def test_grammar_with_ignore_eos_is_refused(tiny_model):
    engine = LLMEngine.from_model(str(tiny_model), CONFIG)
    p = SamplingParams(ignore_eos=True, grammar=Grammar("json_object"))
    with pytest.raises(InvalidRequest) as info:
        engine.add_request(Request("x", [1, 2, 3], p))
    assert info.value.param == "response_format"


def test_grammar_text_is_plain_data_across_the_wire():
    """The grammar travels as its kind and schema text (msgspec), and llguidance accepts
    what the gateway-side validator accepts."""
    from loraplex.engine.grammar_spec import grammar_problem, grammar_text
    from loraplex.engine.wire import Add, server_decoder

    g = Grammar("json_schema", json.dumps({"type": "object", "properties": {"b": {}, "a": {}}}))
    msg = Add(Request("w", [1], SamplingParams(grammar=g)))
    back = server_decoder().decode(llguidance_free_encode(msg))
    assert back.request.sampling.grammar == g  # property order kept: it is generation order
    assert grammar_problem(g) == ""
    assert llguidance.LLMatcher.validate_grammar(grammar_text(g)) == ""
    assert "not" in grammar_problem(Grammar("json_schema", '{"not": {}}'))
    assert grammar_problem(Grammar("json_schema", "[1")) != ""


def llguidance_free_encode(msg) -> bytes:
    from loraplex.engine.wire import encoder

    return encoder().encode(msg)


def test_a_think_block_is_free_and_the_grammar_holds_after_it(tiny_model):
    """A thinking model: the output may open with the think-start token, then runs free
    until the think-end token, then follows the grammar (vLLM applies structured outputs
    after the reasoning). Think tags here are tokens the model itself produces first."""
    engine = LLMEngine.from_model(str(tiny_model), CONFIG)
    try:

        def tokens(rid: str, params: SamplingParams) -> list[int]:
            engine.add_request(Request(rid, "Think, then answer:", params))
            got: list[int] = []
            while engine.has_unfinished():
                for out in engine.step():
                    assert out.error is None, out.error
                    got += out.choices[0].token_ids
            return got

        free = tokens("free", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
        start, end = free[0], free[k]
        schema = {
            "type": "object",
            "properties": {"a": {"type": "boolean"}},
            "required": ["a"],
            "additionalProperties": False,
        }
        spec = json.dumps(schema)
        p = SamplingParams(max_tokens=k + 1 + max_output_bytes(schema) + 1, temperature=0.0)
        think = Grammar("json_schema", spec, think_start=start, think_end=end)
        got = tokens("think", msgspec.structs.replace(p, grammar=think))
        assert got[: k + 1] == free[: k + 1]  # the think block ran unconstrained
        answer = engine.tokenizer.decode(got[k + 1 :], skip_special_tokens=True)
        jsonschema.validate(json.loads(answer), schema)  # the grammar held after it
        plain = tokens("plain", msgspec.structs.replace(p, grammar=Grammar("json_schema", spec)))
        assert plain[:1] != free[:1] or start == plain[0]  # the control: constrained at once
        jsonschema.validate(
            json.loads(engine.tokenizer.decode(plain, skip_special_tokens=True)), schema
        )
    finally:
        engine.shutdown()
