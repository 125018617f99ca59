"""Structured outputs over the tokenizer of the default model (SmolLM2's GGUF, 49,152 ids) as
each transformers version builds it.

transformers 5.17 (the H200 image's) gives the GGUF's byte-level BPE the decoder
``Sequence[ByteFallback, Fuse, Replace, ByteLevel]``; 5.25 a plain ``ByteLevel``. llguidance
took the first for SentencePiece byte fallback: ``Ġ`` stayed two bytes, no token held a space,
and after ``{"key":`` every mask was empty (on the H200, 1,017 of 1,024 constrained requests
of ``bench_structured.py`` ended with ``error`` after 4 tokens). Both decoders are built here
from the tokenizer installed (the 5.17 one by setting its decoder), so the case runs whatever
transformers this machine has.

Exactly what is asserted: a valid JSON value, tokenized by the tokenizer, is accepted token by
token by the compiled grammar and ends it; a tokenizer llguidance still misreads is refused
when grammars are first compiled (not one wrong mask per request); and through the engine
(toy runner, asynchronous steps, chunked prefill, constrained rows beside unconstrained ones)
every constrained request ends with ``stop`` and validates.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import jsonschema
import pytest
from tokenizers import decoders

from loraplex.engine.api import Grammar, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path
from loraplex.engine.structured import GrammarCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from engine_drive import run_to_end
from json_schemas import max_output_bytes, schemas
from toy_runner import ToyRunner

EOS = 2  # <|im_end|>, the GGUF's eos
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["a b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}
VALUE = '{"name": "x y", "tags": ["a b", "c"]}'


def _with_decoder(tok, decoder):
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.decoder = decoder
    return tok


@pytest.fixture(scope="module")
def gguf_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# transformers 5.17's decoder for a GPT-2-style GGUF vocabulary (what the H200 image builds)
DECODER_5_17 = decoders.Sequence(
    [
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Replace("\u2581", " "),
        decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True),
    ]
)


@pytest.fixture(scope="module", params=["as-installed", "transformers-5.17"])
def tokenizer(request, gguf_tokenizer):
    if request.param == "as-installed":
        return gguf_tokenizer
    tok = _with_decoder(gguf_tokenizer, DECODER_5_17)
    assert tok.decode(tok.encode(VALUE, add_special_tokens=False)) == VALUE  # HF reads it
    return tok


def test_a_valid_value_is_accepted_token_by_token(tokenizer):
    cache = GrammarCache(tokenizer, len(tokenizer), frozenset({EOS}))
    try:
        matcher = cache.get(Grammar("json_schema", json.dumps(SCHEMA))).result().deep_copy()
    finally:
        cache.shutdown()
    ids = tokenizer.encode(VALUE, add_special_tokens=False)
    for i, t in enumerate(ids):
        assert matcher.consume_token(t), (i, tokenizer.decode(ids[: i + 1]), matcher.get_error())
    assert matcher.is_accepting() and matcher.consume_token(EOS)


def test_a_tokenizer_llguidance_misreads_is_refused(gguf_tokenizer):
    # HF decodes with it (ByteFallback after ByteLevel changes nothing here), llguidance
    # sees ByteFallback in the sequence and would read SentencePiece pieces
    tok = _with_decoder(
        gguf_tokenizer, decoders.Sequence([decoders.ByteLevel(), decoders.ByteFallback()])
    )
    assert tok.decode(tok.encode(VALUE, add_special_tokens=False)) == VALUE
    cache = GrammarCache(tok, len(tok), frozenset({EOS}))
    try:
        with pytest.raises(RuntimeError, match="llguidance reads this tokenizer"):
            cache.get(Grammar("json_schema", json.dumps(SCHEMA))).result()
    finally:
        cache.shutdown()


def test_engine_constrained_requests_stop_and_validate(tokenizer):
    """Async steps, chunked prefill (64-token budget), 16 constrained requests over 8
    schemas beside 16 unconstrained ones, 32 in flight; random logits over the real vocab."""
    runner = ToyRunner(tokenizer, num_blocks=1024, block_size=16, max_model_len=1024, eos=(EOS,))
    engine = LLMEngine(
        runner,
        EngineConfig(
            max_num_seqs=32, max_num_batched_tokens=64, max_model_len=1024, async_scheduling=True
        ),
    )
    pool = schemas(8, seed=11)
    requests, schema_of = [], {}
    for i in range(32):
        chat = [{"role": "user", "content": f"Item {i}: describe it as JSON."}]
        ids = list(
            tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        if i % 2 == 0:
            schema = pool[(i // 2) % len(pool)]
            p = SamplingParams(
                max_tokens=max_output_bytes(schema) + 1,
                temperature=0.0 if i % 4 else 0.8,
                seed=i,
                grammar=Grammar("json_schema", json.dumps(schema)),
            )
            schema_of[f"r{i}"] = schema
        else:
            p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        requests.append(Request(f"r{i}", ids, p))
    tokens, finish, errors = run_to_end(engine, requests)
    bad = {
        rid: (finish.get(rid), errors.get(rid), tokenizer.decode(tokens[rid])[:80])
        for rid in schema_of
        if finish.get(rid) != "stop"
    }
    assert not bad, bad
    for rid, schema in schema_of.items():
        text = tokenizer.decode(tokens[rid], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), schema)
    assert all(finish[r.request_id] == "length" for r in requests if r.request_id not in schema_of)
