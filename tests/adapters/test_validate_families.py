"""Upload validation per family: PEFT adapters made on tiny Qwen3, Mistral-Nemo and Phi-3
models (transformers' own config classes) pass against the spec read from their
``config.json``; an adapter of the wrong shape or module names for the family is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from adapter_files import lora_config, lora_tensors, write_lora

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.spec import ATTENTION, MLP, BaseModelSpec
from loraplex.adapters.validate import validate_dir

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
TARGETS = {
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral-nemo": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def _hf_config(kind: str):
    from transformers import MistralConfig, Phi3Config, Qwen3Config

    if kind == "qwen3":
        return Qwen3Config(**COMMON, head_dim=32)  # q 128 wide on a 64 hidden
    if kind == "mistral-nemo":
        return MistralConfig(**COMMON, head_dim=32)
    return Phi3Config(**COMMON, pad_token_id=0)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def family(request, tmp_path_factory) -> tuple[str, BaseModelSpec, Path]:
    """(kind, the spec from its config.json, a PEFT adapter on every adaptable module)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kind = request.param
    cfg = _hf_config(kind)
    root = tmp_path_factory.mktemp(kind)
    spec = BaseModelSpec.from_hf_config(kind, json.loads(cfg.to_json_string()))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS[kind])))
    peft.save_pretrained(root / "peft")
    return kind, spec, root / "peft"


def test_peft_adapter_of_each_family_accepted(family):
    kind, spec, adapter = family
    assert set(spec.modules) == set(TARGETS[kind])
    v = validate_dir(adapter, spec, max_rank=8)
    assert set(v.target_modules) == set(TARGETS[kind]) and v.num_tensors == 2 * 2 * len(
        TARGETS[kind]
    )


def _refused(directory: Path, spec: BaseModelSpec, *words: str) -> None:
    with pytest.raises(InvalidAdapter) as info:
        validate_dir(directory, spec, max_rank=8)
    for word in words:
        assert word in info.value.message, info.value.message


def test_bad_adapter_of_each_family_refused(family, tmp_path):
    kind, spec, _ = family
    if kind == "phi3":
        # the split names do not exist on Phi-3 ...
        as_llama = dataclasses.replace(spec, modules=ATTENTION + MLP)
        split = write_lora(tmp_path / "split", as_llama, targets=("v_proj",))
        _refused(split, spec, "self_attn.v_proj", "qkv_proj")
        # ... and a fused B must cover q, k and v (here: only q's rows)
        t = lora_tensors(spec, 2, ("qkv_proj",))
        for name in [n for n in t if "lora_B" in n]:
            t[name] = t[name][: spec.num_heads * spec.head_dim]
        bad = write_lora(tmp_path / "short", spec, tensors=t, config=lora_config(2, ("qkv_proj",)))
        _refused(
            bad,
            spec,
            "qkv_proj",
            f"[{(spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim}, 2]",
        )
        return
    # an adapter trained as if head_dim were hidden / heads: q is 64 wide, not 128
    t = lora_tensors(spec, 2, ("q_proj",))
    for name in [n for n in t if "lora_B" in n]:
        t[name] = t[name][: spec.hidden_size]
    _refused(write_lora(tmp_path / "q", spec, tensors=t), spec, "q_proj", "[128, 2]")
    # the fused Phi-3 names do not exist here
    fused = lora_tensors(spec, 2, ("q_proj",))
    fused = {k.replace("q_proj", "qkv_proj"): v for k, v in fused.items()}
    cfg = lora_config(2, ("qkv_proj",))
    _refused(write_lora(tmp_path / "f", spec, tensors=fused, config=cfg), spec, "qkv_proj")
