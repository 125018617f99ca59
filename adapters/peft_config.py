"""Check ``adapter_config.json``: a plain PEFT LoRA the engine can serve, nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import InvalidAdapter

MAX_CONFIG_BYTES = 256 * 1024


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    use_rslora: bool
    base_model_name: str | None


def _bad(message: str) -> InvalidAdapter:
    return InvalidAdapter(f"adapter_config.json: {message}", param="adapter_config")


def read_config(path: Path, *, max_rank: int) -> LoraConfig:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _bad(f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _bad("must be a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise _bad('peft_type is missing (expected "LORA")')
    if peft_type != "LORA":
        raise _bad(f"peft_type {peft_type!r} is not supported: only LORA adapters are served")
    if cfg.get("use_dora"):
        raise _bad("use_dora is true: DoRA adapters are not supported, only plain LoRA")
    _refuse_set(cfg, "modules_to_save", "fully trained modules are not supported")
    _refuse_set(cfg, "rank_pattern", "per-module ranks are not supported")
    _refuse_set(cfg, "alpha_pattern", "per-module alphas are not supported")
    _refuse_set(cfg, "trainable_token_indices", "trainable tokens are not supported")
    _refuse_set(cfg, "target_parameters", "LoRA on parameters (not modules) is not supported")
    _refuse_set(cfg, "use_qalora", "QA-LoRA is not supported")
    _refuse_set(cfg, "alora_invocation_tokens", "activated LoRA (aLoRA) is not supported")
    if cfg.get("bias", "none") != "none":
        raise _bad(f'bias {cfg.get("bias")!r} is not supported (only "none")')
    if cfg.get("fan_in_fan_out"):
        raise _bad("fan_in_fan_out is true: only Linear (not Conv1D) layers are supported")
    if cfg.get("lora_bias"):
        raise _bad("lora_bias is true: LoRA biases are not supported")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _bad(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _bad(f"rank r={rank} exceeds the maximum rank {max_rank} this server accepts")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < 1e6:
        raise _bad(f"lora_alpha must be a positive number, got {alpha!r}")
    base = cfg.get("base_model_name_or_path")
    return LoraConfig(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        base_model_name=base if isinstance(base, str) else None,
    )


def _refuse_set(cfg: dict[str, object], key: str, why: str) -> None:
    if cfg.get(key):
        raise _bad(f"{key} is set: {why}")
