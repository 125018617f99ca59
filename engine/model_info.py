"""The engine side's description of what it serves (:class:`engine.client.ModelInfo`)."""

from __future__ import annotations

import uuid

from loraplex.engine.client import AdapterShape, ModelInfo
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.tokenizer_files import export_tokenizer


def describe(engine: LLMEngine, *, name: str, model: str) -> ModelInfo:
    runner = engine.runner
    c = runner.config
    return ModelInfo(
        engine_id=uuid.uuid4().hex,
        name=name,
        model=model,
        max_model_len=int(engine.max_model_len),
        vocab_size=int(runner.vocab_size),
        kv_tokens=int(engine.kv_tokens),
        eos_token_ids=tuple(sorted(int(t) for t in runner.eos_token_ids)),
        max_lora_rank=int(engine.config.max_lora_rank),
        max_loras=int(engine.slots.num_slots),
        device=str(runner.device),
        dtype=str(runner.dtype).removeprefix("torch."),
        adapter_shape=AdapterShape(
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            modules=c.adapter_modules,
            num_experts=c.num_experts,
            moe_intermediate_size=c.moe_intermediate_size,
        ),
        tokenizer_files=export_tokenizer(engine.tokenizer),
    )
