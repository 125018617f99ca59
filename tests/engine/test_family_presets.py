"""Qwen3, Mistral-Nemo, Phi-3/4 and Gemma 2/3: their ``config.json`` read (and refused) by name, and the
``dummy:`` presets of their real shapes equal to what the real config gives."""

from __future__ import annotations

import dataclasses
import json

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


# google/gemma-2-9b's config.json (transformers 4.42 keys), and the text model of
# google/gemma-3-12b-it (its text_config with the Gemma3TextConfig defaults it relied on,
# as a Gemma3ForCausalLM checkpoint of it writes them, in the older rope keys)
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "gemma2", "num_attention_heads": 16, "num_hidden_layers": 42,
    "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "sliding_window_size": 4096, "vocab_size": 256000,
}  # fmt: skip
GEMMA3_12B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3840, "intermediate_size": 15360, "max_position_embeddings": 131072,
    "model_type": "gemma3_text", "num_attention_heads": 16, "num_hidden_layers": 48,
    "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
    "sliding_window": 1024, "sliding_window_pattern": 6, "vocab_size": 262208,
}  # fmt: skip


def test_gemma_presets_are_their_real_configs():
    gemma2 = read(GEMMA2_9B)
    assert gemma2 == PRESETS["gemma2-9b"]
    assert gemma2.adapter_modules == SPLIT_MODULES and gemma2.attn_scale == 256**-0.5
    assert [gemma2.layer_window(i) for i in range(3)] == [4096, 0, 4096]
    assert gemma2.local_rope_inv_freq() is None  # one rope for every layer
    gemma3 = read(GEMMA3_12B)
    assert gemma3 == PRESETS["gemma3-12b"]
    assert gemma3.qk_norm and gemma3.attn_logit_softcap is None
    assert [i for i in range(48) if not gemma3.layer_window(i)] == list(range(5, 48, 6))
    local = gemma3.local_rope_inv_freq()
    assert local is not None and float(local[1]) == pytest.approx(10000 ** (-2 / 256))
    assert float(gemma3.rope_inv_freq()[1]) == pytest.approx(1e6 ** (-2 / 256) / 8)


def test_gemma3_config_of_transformers_5_reads_the_same():
    """transformers 5 writes ``layer_types`` and ``rope_parameters`` per layer type."""
    from transformers import Gemma3TextConfig

    keys = {k: v for k, v in GEMMA3_12B.items() if not k.startswith(("rope", "sliding_window_"))}
    keys = {k: v for k, v in keys.items() if k not in ("architectures", "model_type")}
    hf = Gemma3TextConfig(**keys, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    })  # fmt: skip
    d = {**json.loads(hf.to_json_string()), "architectures": ["Gemma3ForCausalLM"]}
    assert "layer_types" in d and "full_attention" in d["rope_parameters"]
    assert read(d) == PRESETS["gemma3-12b"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"hidden_activation": "gelu"}, "hidden_act 'gelu'"),
        ({"layer_types": ["chunked_attention"] * 48}, "layer_types"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope scaling type 'yarn'"),
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "a Gemma3ForCausalLM checkpoint"),
    ],
)
def test_gemma_refusals(change, match):
    with pytest.raises(UnsupportedModel, match=match):
        read({**GEMMA3_12B, **change})


def test_gemma3_without_a_window():
    """sliding_window null: the local layers see every position, on their own rope base."""
    cfg = read({**GEMMA3_12B, "sliding_window": None})
    assert cfg.sliding_window is None and cfg.layer_window(0) == 0
    assert cfg.local_rope_inv_freq() is not None and cfg.sliding_layers[0]


def test_gemma_preset_runs_a_step():
    """A dummy Gemma 3 (tiny shapes, the preset's flags) runs prefill and decode past its
    window on random weights (bfloat16, the norms' 1 + w held in float32 beside them)."""
    cfg = dataclasses.replace(
        PRESETS["gemma3-12b"], vocab_size=512, hidden_size=64, intermediate_size=96,
        num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=3,
        sliding_layers=PRESETS["gemma3-12b"].sliding_layers[:6], max_position_embeddings=64,
    )  # fmt: skip
    tiny = load_model("dummy:tiny")
    weights = random_weights(cfg, torch.bfloat16, torch.device("cpu"))
    assert weights.norm.dtype == torch.float32 and weights.layers[0].pre_ff_norm is not None
    model = LoadedModel(cfg, weights, tiny.tokenizer, tiny.eos_token_ids, "dummy")
    runner = ModelRunner(model, max_num_seqs=2, max_model_len=32, num_blocks=16, block_size=4)
    prefill = runner.execute(ScheduledBatch([SeqChunk(0, [5, 6, 7, 8, 9], 0, [0, 1], -1, True)]))
    decode = runner.execute(ScheduledBatch([SeqChunk(0, [3], 5, [0, 1], -1, True)]))
    assert bool(torch.isfinite(prefill).all() and torch.isfinite(decode).all())
