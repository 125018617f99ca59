"""Validation from primitives: a hand-made spec and hand-written safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from adapter_files import TINY, lora_config, lora_tensors, write_lora

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.safetensors_header import read_header
from loraplex.adapters.validate import validate_dir


def check(directory: Path, max_rank: int = 8):
    return validate_dir(directory, TINY, max_rank=max_rank)


def refused(directory: Path, *words: str, max_rank: int = 8) -> str:
    with pytest.raises(InvalidAdapter) as info:
        check(directory, max_rank)
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value.message


def test_good_adapter_summarised(tmp_path: Path) -> None:
    d = write_lora(tmp_path, rank=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"))
    v = check(d)
    assert v.config.rank == 4 and v.config.alpha == 8.0
    assert v.target_modules == ("q_proj", "k_proj", "o_proj", "down_proj")
    assert v.num_tensors == 2 * 2 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_allowed_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    check(write_lora(tmp_path, tensors=lora_tensors(TINY, 2, dtype=dtype)))


def test_header_parsed_by_hand_matches_safetensors(tmp_path: Path) -> None:
    d = write_lora(tmp_path, rank=3)
    infos = {t.name: t for t in read_header(d / "adapter_model.safetensors")}
    for name, tensor in lora_tensors(TINY, 3).items():
        assert infos[name].shape == tuple(tensor.shape) and infos[name].dtype == "F32"


def test_bad_dtype(tmp_path: Path) -> None:
    refused(write_lora(tmp_path, tensors=lora_tensors(TINY, 2, dtype=torch.float64)), "F64")


def test_truncated(tmp_path: Path) -> None:
    d = write_lora(tmp_path)
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(d, "truncated")


def test_trailing_and_overlapping_bytes(tmp_path: Path) -> None:
    d = write_lora(tmp_path)
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    refused(d, "trailing")


def test_header_lies_about_size(tmp_path: Path) -> None:
    d = write_lora(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    refused(d, "header length")


def test_pickle_refused_by_content(tmp_path: Path) -> None:
    d = write_lora(tmp_path)
    torch.save(lora_tensors(TINY, 2), d / "adapter_model.safetensors")
    refused(d, "pickle")


def test_wrong_shape(tmp_path: Path) -> None:
    t = lora_tensors(TINY, 2)
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    t[name] = torch.zeros(64, 2)  # v_proj out is num_kv_heads * head_dim = 32
    refused(write_lora(tmp_path, tensors=t), "v_proj", "[64, 2]", "[32, 2]")


def test_unknown_module(tmp_path: Path) -> None:
    t = lora_tensors(TINY, 2)
    t["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(2, 64)
    refused(write_lora(tmp_path, tensors=t), "rotary")


def test_embedding_lora_refused(tmp_path: Path) -> None:
    t = lora_tensors(TINY, 2)
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    refused(write_lora(tmp_path, tensors=t), "lm_head")


def test_layer_out_of_range(tmp_path: Path) -> None:
    t = lora_tensors(TINY, 2)
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 64)
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 2)
    refused(write_lora(tmp_path, tensors=t), "layer 7")


def test_missing_lora_b(tmp_path: Path) -> None:
    t = lora_tensors(TINY, 2)
    del t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    refused(write_lora(tmp_path, tensors=t), "lora_B")


def test_rank_over_max(tmp_path: Path) -> None:
    refused(write_lora(tmp_path, rank=16), "r=16", "maximum rank 8")


def test_config_rank_disagrees_with_tensors(tmp_path: Path) -> None:
    d = write_lora(tmp_path, rank=2, config=lora_config(4))
    refused(d, "rank 4")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite(tmp_path: Path, value: float) -> None:
    t = lora_tensors(TINY, 2)
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"][0, 3] = value
    refused(write_lora(tmp_path, tensors=t), "NaN or infinite", "layers.1.self_attn.v_proj")


def test_dora_refused_by_name(tmp_path: Path) -> None:
    refused(write_lora(tmp_path, config=lora_config(2, use_dora=True)), "DoRA")


def test_dora_magnitude_tensor_refused(tmp_path: Path) -> None:
    t = lora_tensors(TINY, 2)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    refused(write_lora(tmp_path, tensors=t), "DoRA")


@pytest.mark.parametrize("peft_type", ["IA3", "PREFIX_TUNING", "LOHA"])
def test_non_lora_refused_by_name(tmp_path: Path, peft_type: str) -> None:
    refused(write_lora(tmp_path, config=lora_config(2, peft_type=peft_type)), peft_type)


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"bias": "all"}, "bias"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"r": "8"}, "r must"),
    ],
)
def test_config_refusals(tmp_path: Path, extra: dict, word: str) -> None:
    refused(write_lora(tmp_path, config=lora_config(2, **extra)), word)


def test_config_not_json(tmp_path: Path) -> None:
    d = write_lora(tmp_path)
    (d / "adapter_config.json").write_text("{not json")
    refused(d, "adapter_config.json", "JSON")


def test_missing_files(tmp_path: Path) -> None:
    d = write_lora(tmp_path)
    (d / "adapter_config.json").unlink()
    refused(d, "adapter_config.json is missing")


def test_config_without_peft_type(tmp_path: Path) -> None:
    cfg = lora_config(2)
    del cfg["peft_type"]
    d = write_lora(tmp_path, config=cfg)
    assert "peft_type" in refused(d)
    assert json.loads((d / "adapter_config.json").read_text())["r"] == 2
