"""Build PEFT LoRA files by hand (no model needed) and small bad variants of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loraplex.adapters.spec import BaseModelSpec

TINY = BaseModelSpec(
    name="tiny-llama",
    num_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def lora_tensors(
    spec: BaseModelSpec,
    rank: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(spec.num_layers):
        for module in targets:
            shape = spec.module_shape(module)
            assert shape is not None
            prefix = f"base_model.model.model.layers.{layer}.{shape.parent}.{module}"
            a = torch.randn(rank, shape.in_features, generator=g) * scale
            b = torch.randn(shape.out_features, rank, generator=g) * scale
            out[f"{prefix}.lora_A.weight"] = a.to(dtype)
            out[f"{prefix}.lora_B.weight"] = b.to(dtype)
    return out


def lora_config(rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj"), **extra: Any) -> dict:
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "base_model_name_or_path": "tiny-llama",
        "task_type": "CAUSAL_LM",
    }
    cfg.update(extra)
    return cfg


def write_lora(
    directory: Path,
    spec: BaseModelSpec = TINY,
    rank: int = 2,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    *,
    seed: int = 0,
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    scale: float = 0.1,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = lora_tensors(spec, rank, targets, seed=seed, scale=scale)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = config if config is not None else lora_config(rank, targets)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory
