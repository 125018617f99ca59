"""Shared engine test fixtures: a byte-level tokenizer, a tiny random Llama, PEFT adapters.

Everything is made here from primitives (no hub access): the tokenizer is a byte-level
BPE trained on a few sentences, the model a 2-layer Llama with random weights, and the
adapters PEFT LoRAs whose ``lora_B`` is randomized (PEFT starts it at zero) so each
adapter visibly changes the greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_tokenizer import build_tokenizer

ADAPTER_SPECS = {  # name -> (rank, alpha, target modules, use_rslora)
    "a-qv": (8, 16, ["q_proj", "v_proj"], False),
    "b-all": (
        16,
        8,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        False,
    ),
    "c-mlp": (4, 8, ["gate_proj", "up_proj", "down_proj"], False),
    "d-attn": (8, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
    "e-o-down": (12, 12, ["o_proj", "down_proj"], False),
}


def build_model(path: Path, vocab_size: int, bos: int, eos: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # large: well-separated logits, so greedy has no near-ties
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def build_adapter(
    base, path: Path, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int
):
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(path)
    peft_model.unload()  # strip the LoRA layers; ``base`` is plain again
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Directory with config, safetensors weights and tokenizer of a tiny random Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(path)
    build_model(path, len(tok), tok.bos_token_id, tok.eos_token_id)
    return path


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Five PEFT adapter directories for ``tiny_model`` (ranks 4..16, various modules)."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, (rank, alpha, targets, rs)) in enumerate(ADAPTER_SPECS.items()):
        out[name] = build_adapter(base, root / name, rank, alpha, targets, rs, seed=100 + i)
    return out
