"""Upload validation per family: PEFT adapters made on tiny Qwen3, Mistral-Nemo, Phi-3 and
Gemma 2/3 models (transformers' own config classes) pass against the spec read from their
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
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _hf_config(kind: str):
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

    if kind == "gemma2":
        return Gemma2Config(**COMMON, head_dim=32, sliding_window=8)
    if kind == "gemma3":
        return Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=8)
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
    if kind.startswith("gemma"):
        # Gemma's MLP is as wide as the config says: a B of up_proj cut to hidden refused
        t = lora_tensors(spec, 2, ("up_proj",))
        for name in [n for n in t if "lora_B" in n]:
            t[name] = t[name][: spec.hidden_size]
        _refused(write_lora(tmp_path / "u", spec, tensors=t), spec, "up_proj", "[96, 2]")
        # an adapter of the multimodal Gemma 3 (its text layers under language_model)
        mm = {
            k.replace("model.model.layers", "model.model.language_model.layers"): v
            for k, v in lora_tensors(spec, 2, ("q_proj",)).items()
        }
        _refused(write_lora(tmp_path / "mm", spec, tensors=mm), spec, "language_model")


def test_gemma_spec_defaults_head_dim_as_transformers():
    """A Gemma config without head_dim means 256 (transformers' default), not hidden/heads."""
    cfg = {"model_type": "gemma3_text", **COMMON}
    assert BaseModelSpec.from_hf_config("g", cfg).head_dim == 256
    assert BaseModelSpec.from_hf_config("q", {**cfg, "model_type": "qwen3"}).head_dim == 16
