"""Qwen3-MoE's ``config.json`` read (and refused) by name, and the ``dummy:qwen3-30b-a3b``
preset equal to what the real config gives, with the memory the docs state for it."""

from __future__ import annotations

import pytest

from loraplex.engine.model.config import MOE_MODULES, UnsupportedModel
from loraplex.engine.model.config import config_from_hf as read
from loraplex.engine.model.presets import PRESETS

# Qwen/Qwen3-30B-A3B's config.json on the Hugging Face hub
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip


def test_qwen3_30b_a3b_preset_is_its_real_config_and_needs_61_gb():
    cfg = read(QWEN3_30B_A3B)
    assert cfg == PRESETS["qwen3-30b-a3b"]
    assert cfg.is_moe and cfg.qk_norm and cfg.adapter_modules == MOE_MODULES
    # the weights in bf16: embedding and head, and per layer attention, router and experts
    h, c = cfg.hidden_size, cfg
    attn = h * (c.q_size + 2 * c.kv_size) + c.q_size * h + 2 * c.head_dim
    experts = c.num_experts * 3 * h * c.moe_intermediate_size + c.num_experts * h
    params = 2 * c.vocab_size * h + h + c.num_layers * (attn + experts + 2 * h)
    assert 60.5e9 < 2 * params < 61.5e9  # README: ~61 GB, one H200


def test_transformers_5_config_names_the_experts_num_local_experts():
    d = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"}
    assert read({**d, "num_local_experts": 128}).num_experts == 128


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mlp_only_layers": [0, 5]}, "dense MLP layers"),
        ({"decoder_sparse_step": 2}, "dense MLP layers"),
        ({"num_experts_per_tok": 129}, "num_experts_per_tok"),
        ({"moe_intermediate_size": 764}, "multiples of 8"),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, "Qwen2MoeForCausalLM"),
    ],
)
def test_moe_refusals(change, match):
    with pytest.raises(UnsupportedModel, match=match):
        read({**QWEN3_30B_A3B, **change})
