"""Model specs: config parsing (and refusals by name), dummy presets, the default GGUF path."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.batch import ScheduledBatch, SeqChunk
from loraplex.engine.model.config import UnsupportedModel, config_from_hf
from loraplex.engine.model.loader import default_model_path, load_model
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "eos_token_id": [5, 6],
}


def test_config_reads_old_and_new_rope_keys():
    old = config_from_hf(
        {**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert old.rope_theta == 5e5 and old.rope_scaling.kind == "linear"
    new = config_from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert new.rope_scaling.kind == "default" and new.eos_token_ids == (5, 6)
    assert new.head_dim == 16 and new.q_size == 64 and new.kv_size == 32
    torch.testing.assert_close(
        old.rope_inv_freq() * 2.0, config_from_hf(BASE | {"rope_theta": 5e5}).rope_inv_freq()
    )


def test_config_architectures():
    qwen = config_from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64})
    assert qwen.qkv_bias and qwen.max_position_embeddings == 4096  # window unused by default
    mistral = config_from_hf(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 1024}
    )
    # served windowed at the full context: every layer local (Mistral); Qwen's layers from
    # max_window_layers on, or as layer_types says
    assert mistral.max_position_embeddings == 4096 and mistral.sliding_window == 1024
    assert mistral.sliding_layers == (True,) * BASE["num_hidden_layers"]
    n = BASE["num_hidden_layers"]
    qwen_window = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64,
                   "use_sliding_window": True, "max_window_layers": 1}  # fmt: skip
    q = config_from_hf(qwen_window)
    assert q.sliding_window == 64 and q.sliding_layers == (False,) + (True,) * (n - 1)
    types = ["sliding_attention"] * (n - 1) + ["full_attention"]
    assert config_from_hf({**qwen_window, "layer_types": types}).sliding_layers[-1] is False
    with pytest.raises(UnsupportedModel, match="layer_types"):
        config_from_hf({**qwen_window, "layer_types": ["chunked_attention"] * n})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_config_refusals(change, match):
    with pytest.raises(UnsupportedModel, match=match):
        config_from_hf({**BASE, **change})


def test_presets_are_valid_and_dummy_tiny_runs():
    for name, cfg in PRESETS.items():
        cfg.validate()
        assert cfg.num_heads % cfg.num_kv_heads == 0, name
    assert {"tiny", "llama3-1b", "llama3-8b", "smollm2-135m"} <= set(PRESETS)
    with pytest.raises(UnsupportedModel, match="unknown dummy preset"):
        load_model("dummy:nope")
    runner = ModelRunner("dummy:tiny", max_num_seqs=2, max_model_len=64, kv_cache_bytes=2**20)
    assert runner.num_blocks == 2**20 // runner.block_bytes()
    tok = runner.tokenizer
    text = "héllo wörld 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < runner.vocab_size
    assert tok.decode([runner.vocab_size - 1]).startswith("<t")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "user" in chat
    logits = runner.execute(ScheduledBatch([SeqChunk(0, ids, 0, [0, 1], -1, True)]))
    assert logits.shape == (1, runner.vocab_size) and torch.isfinite(logits).all()


def test_default_model_path_is_the_smollm2_gguf():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
