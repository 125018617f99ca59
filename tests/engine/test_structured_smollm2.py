"""Structured outputs on the real default model (SmolLM2-135M-Instruct GGUF): 56 generated
JSON schemas (nested objects, arrays, enums, unions, required and optional properties) in
ONE mixed batch with unconstrained requests, half of the constrained ones through LoRA
adapters, greedy and sampled.

Exactly what is asserted: every constrained request ends with ``stop`` (its ``max_tokens``
is above ``max_output_bytes`` of its schema, a bound on any valid value's bytes, hence
tokens), its text parses as JSON and validates against its schema (``jsonschema``); the
unconstrained requests beside them generate what they generate in a batch of their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

from loraplex.engine.api import AdapterRef, Grammar, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.offline import OfflineEngine

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
from common import write_peft_adapter  # noqa: E402
from json_schemas import max_output_bytes, schemas  # noqa: E402

NUM_SCHEMAS = 56
CONFIG = EngineConfig(
    max_num_seqs=64, num_gpu_blocks=1024, max_model_len=1024, enable_prefix_caching=True
)


@pytest.fixture(scope="module")
def smollm2_adapters(tmp_path_factory) -> list[AdapterRef]:
    import torch

    root = tmp_path_factory.mktemp("smollm2-lora")
    cfg = PRESETS["smollm2-135m"]
    return [
        AdapterRef(
            f"lora{i}",
            str(write_peft_adapter(root / f"lora{i}", cfg, 8, seed=i, dtype=torch.float32)),
        )
        for i in range(2)
    ]


def _run(engine: OfflineEngine, requests: list[Request]) -> dict[str, tuple[str, str | None]]:
    for r in requests:
        engine.add_request(r)
    text = {r.request_id: "" for r in requests}
    finish: dict[str, str | None] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for d in out.deltas:
                text[out.request_id] += d.text
                if d.finish_reason is not None:
                    finish[out.request_id] = d.finish_reason
            if out.error is not None:
                finish[out.request_id] = f"error: {out.error}"
    return {k: (text[k], finish.get(k)) for k in text}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on a loaded 2-core box (64 rows of a 135M model per step)
def test_56_schemas_in_one_mixed_batch_on_smollm2(smollm2_adapters):
    engine = OfflineEngine(LLMEngine.from_model(default_model_path(), CONFIG))
    tok = engine.core.tokenizer

    def prompt(content: str) -> list[int]:
        chat = [{"role": "user", "content": content}]
        return list(
            tok.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    ask = prompt("Describe a product as a JSON object.")
    constrained = []
    for i, schema in enumerate(schemas(NUM_SCHEMAS, seed=7)):
        p = SamplingParams(
            max_tokens=max_output_bytes(schema) + 1,
            temperature=0.0 if i % 2 else 0.8,
            seed=i,
            grammar=Grammar("json_schema", json.dumps(schema)),
        )
        adapter = smollm2_adapters[i % 4 // 2] if i % 4 >= 2 else None  # half through one
        constrained.append((Request(f"s{i}", ask, p, adapter), schema))
    free = [
        Request(
            f"free{i}",
            prompt(f"Write a sentence about the number {i}."),
            SamplingParams(max_tokens=24, temperature=0.0),
            smollm2_adapters[i % 2] if i % 3 else None,
        )
        for i in range(8)
    ]
    requests = [r for r, _ in constrained]
    got = _run(engine, requests[:4] + free + requests[4:])  # the free ones in their midst

    failures = []
    for r, schema in constrained:
        text, finish = got[r.request_id]
        if finish != "stop":
            failures.append((r.request_id, finish, text))
            continue
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append((r.request_id, str(exc)[:200], text))
    assert not failures, failures
    stats = engine.stats()
    assert stats.grammar_compiles == NUM_SCHEMAS and stats.grammar_mask_rows > 0

    alone = _run(OfflineEngine(LLMEngine.from_model(default_model_path(), CONFIG)), free)
    for r in free:
        assert got[r.request_id] == alone[r.request_id], r.request_id
