"""Upload validation of Qwen3-MoE adapters: the spec from a tiny ``Qwen3MoeConfig``'s
config.json knows the experts' module names and shapes; PEFT's per-expert adapter
(``mlp.experts.<e>.gate_proj``) passes, a bad one is refused naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.spec import ATTENTION, EXPERTS, BaseModelSpec
from loraplex.adapters.validate import validate_dir

E, H, MI, R = 4, 64, 32, 4


@pytest.fixture(scope="module")
def spec() -> BaseModelSpec:
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=H, intermediate_size=96, moe_intermediate_size=MI,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=E, num_experts_per_tok=2,
    )  # fmt: skip
    return BaseModelSpec.from_hf_config("moe", json.loads(cfg.to_json_string()))


def _tensors() -> dict[str, torch.Tensor]:
    dims = {"gate_proj": (H, MI), "up_proj": (H, MI), "down_proj": (MI, H)}
    out = {}
    for layer in range(2):
        pre = f"base_model.model.model.layers.{layer}"
        out[f"{pre}.self_attn.q_proj.lora_A.weight"] = torch.randn(R, H)
        out[f"{pre}.self_attn.q_proj.lora_B.weight"] = torch.randn(128, R)
        for e in range(E):
            for m, (i, o) in dims.items():
                out[f"{pre}.mlp.experts.{e}.{m}.lora_A.weight"] = torch.randn(R, i)
                out[f"{pre}.mlp.experts.{e}.{m}.lora_B.weight"] = torch.randn(o, R)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 8,
              "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_moe_spec_and_per_expert_adapter_accepted(spec, tmp_path):
    assert spec.modules == ATTENTION + EXPERTS and spec.num_experts == E
    v = validate_dir(_write(tmp_path / "ok", _tensors()), spec, max_rank=8)
    assert v.target_modules == ("q_proj", *EXPERTS) and v.num_tensors == 2 * 2 * (1 + 3 * E)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: {k.replace(".experts.3.", ".experts.4."): v for k, v in t.items()},
         ("expert 4", "has 4")),
        (lambda t: {k.replace(".experts.0.gate_proj.", ".gate."): v for k, v in t.items()},
         ("mlp.gate", "cannot adapt")),
        (lambda t: {k: v[:-1] if "experts.2.down_proj.lora_B" in k else v for k, v in t.items()},
         ("experts.2.down_proj.lora_B", "needs [64, 4]")),
        (lambda t: {k: v for k, v in t.items() if "layers.1.mlp.experts.1.up_proj.lora_B" not in k},
         ("layer 1 expert 1 experts.up_proj has no lora_B",)),
    ],
    ids=["no-such-expert", "router", "shape", "missing-B"],
)  # fmt: skip
def test_bad_moe_adapter_refused(spec, tmp_path, change, words):
    with pytest.raises(InvalidAdapter) as info:
        validate_dir(_write(tmp_path / "bad", change(_tensors())), spec, max_rank=8)
    for word in words:
        assert word in info.value.message, info.value.message
