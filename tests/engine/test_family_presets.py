"""Qwen3, Mistral-Nemo and Phi-3/4: their ``config.json`` read (and refused) by name, and the
``dummy:`` presets of their real shapes equal to what the real config gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model.config import FUSED_MODULES, SPLIT_MODULES, UnsupportedModel
from loraplex.engine.model.config import config_from_hf as read
from loraplex.engine.model.loader import LoadedModel, load_model, random_weights
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner

# the config.json of each model on the Hugging Face hub (the keys config_from_hf reads;
# Phi-4-mini's 48 short and long rope factors written as 1.0, as the preset holds them)
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36,
    "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
NEMO_12B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 14336,
    "max_position_embeddings": 1024000, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "vocab_size": 131072,
}  # fmt: skip
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "bos_token_id": 199999, "eos_token_id": 199999,
    "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 24,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
    "pad_token_id": 199999, "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
    "vocab_size": 200064,
}  # fmt: skip


def test_qwen3_and_mistral_nemo_presets_are_their_real_configs():
    qwen3 = read(QWEN3_8B)
    assert qwen3 == PRESETS["qwen3-8b"]
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.adapter_modules == SPLIT_MODULES
    nemo = read(NEMO_12B)
    assert nemo == PRESETS["mistral-nemo-12b"]
    assert (nemo.q_size, nemo.hidden_size) == (4096, 5120)  # head_dim from the config


def test_phi4_mini_preset_is_its_real_config():
    """Partial rotary (96 of 128 dims) and longrope, served at the original 4k context."""
    phi4 = read(PHI4_MINI)
    assert phi4 == PRESETS["phi4-mini"]
    assert phi4.fused_proj and phi4.adapter_modules == FUSED_MODULES
    assert phi4.rotary_dim == 96 and phi4.max_position_embeddings == 4096
    assert phi4.rope_inv_freq().shape == (48,)
    assert phi4.rope_scaling.attention_factor == pytest.approx(1.1902380714238083)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, "partial_rotary_factor=0.75 is not supported"),
        (
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": []}},
            "one short factor per rotary frequency",
        ),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ],
)
def test_rotary_refusals(change, match):
    with pytest.raises(UnsupportedModel, match=match):
        read({**PHI4_MINI, **change})


@pytest.mark.parametrize("flag", ["qk_norm", "fused_proj"])
def test_random_weights_of_each_family_run(flag):
    """A dummy model of each family's flags runs a step (random weights of the right shapes)."""
    tiny = load_model("dummy:tiny")
    cfg = dataclasses.replace(tiny.config, **{flag: True}, head_dim=32)
    weights = random_weights(cfg, torch.float32, torch.device("cpu"))
    if flag == "qk_norm":
        assert weights.layers[0].q_norm is not None and weights.layers[0].q_norm.shape == (32,)
    model = LoadedModel(cfg, weights, tiny.tokenizer, tiny.eos_token_ids, "dummy")
    runner = ModelRunner(model, max_num_seqs=2, max_model_len=32, num_blocks=16, block_size=4)
    logits = runner.execute(ScheduledBatch([SeqChunk(0, [5, 6, 7], 0, [0, 1], -1, True)]))
    assert logits.shape == (1, cfg.vocab_size) and bool(torch.isfinite(logits).all())
