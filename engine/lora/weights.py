"""Reading a PEFT LoRA adapter into host tensors, validated against the served base model.

An adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
Everything this engine cannot serve exactly is refused by name (:class:`AdapterIncompatible`);
a directory or file that cannot be read at all raises :class:`AdapterLoadError`. The scale
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA) is folded into B here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import AdapterIncompatible, AdapterLoadError
from engine.model.config import ModelConfig

# projection groups of the slot pool, in concatenation order (docs/engine-internals.md)
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, mods in GROUPS.items() for m in mods}
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
}
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def module_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) in the base model."""
    h, i = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (h, config.q_size),
        "k_proj": (h, config.kv_size),
        "v_proj": (h, config.kv_size),
        "o_proj": (config.q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scale folded in

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class PackedGroup:
    """One projection group of an adapter, all layers, as the slot pool stores it (so a slot
    write is a few copies). ``r`` is this adapter's largest rank in the group, not the pool's."""

    a: torch.Tensor  # [L, P, r, in]
    b: torch.Tensor  # [L, N, r]
    ranks: torch.Tensor  # [L, P] int32 (0: module or layer not in the adapter)


@dataclass(frozen=True)
class LoraWeights:
    """One adapter on the host: ``(layer, module) -> LoraModule`` (views into ``groups``)."""

    modules: dict[tuple[int, str], LoraModule]
    groups: dict[str, PackedGroup]

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(m for _, m in self.modules)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.a, m.b))


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterLoadError(f"adapter_config.json not found in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"adapter_config.json could not be read: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterIncompatible("adapter_config.json must hold a JSON object")
    return cfg


def _check_config(cfg: dict[str, Any]) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    refusals = [
        (peft_type != "LORA", f"peft_type {peft_type!r} is not supported (only LORA)"),
        (bool(cfg.get("use_dora")), "DoRA adapters (use_dora=true) are not supported"),
        (
            cfg.get("bias", "none") != "none",
            f"bias={cfg.get('bias')!r}: LoRA bias is not supported",
        ),
        (bool(cfg.get("lora_bias")), "lora_bias=true is not supported"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out=true is not supported"),
        (bool(cfg.get("modules_to_save")), "modules_to_save is not supported (LoRA weights only)"),
        (bool(cfg.get("trainable_token_indices")), "trainable_token_indices is not supported"),
        (bool(cfg.get("target_parameters")), "target_parameters is not supported"),
        (bool(cfg.get("use_qalora")), "QA-LoRA (use_qalora=true) is not supported"),
        (bool(cfg.get("alora_invocation_tokens")), "activated LoRA (aLoRA) is not supported"),
    ]
    for bad, msg in refusals:
        if bad:
            raise AdapterIncompatible(msg)
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise AdapterIncompatible(f"{key} must be a positive number, got {v!r}")


def _pattern_value(patterns: dict[str, Any], name: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module name ending in it (regex)."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return float(val)
    return default


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise AdapterIncompatible(
                f"{pickles[0]} is a pickle file, which is never loaded; "
                "save the adapter as adapter_model.safetensors"
            )
        raise AdapterLoadError(f"adapter_model.safetensors not found in {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(st), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"adapter_model.safetensors could not be read: {e}") from e


def _parse_key(key: str, config: ModelConfig) -> tuple[int, str, str]:
    if "magnitude" in key:
        raise AdapterIncompatible(f"tensor {key!r}: DoRA magnitude vectors are not supported")
    m = _KEY.match(key)
    if m is None:
        raise AdapterIncompatible(f"tensor {key!r} is not a LoRA A/B weight of a decoder layer")
    layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
    if module not in MODULE_GROUP or parent != _PARENT.get(module, "mlp"):
        raise AdapterIncompatible(
            f"tensor {key!r}: module {parent}.{module} does not exist in the base model "
            f"(supported: {', '.join(MODULE_GROUP)})"
        )
    if layer >= config.num_layers:
        raise AdapterIncompatible(
            f"tensor {key!r}: layer {layer} does not exist (base has {config.num_layers})"
        )
    return layer, module, ab


def read_adapter(
    path: Path,
    config: ModelConfig,
    *,
    max_rank: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> LoraWeights:
    """Read and validate the PEFT adapter at ``path``; host tensors in ``dtype``, scale folded."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    cfg = _read_config(path)
    _check_config(cfg)
    tensors = _load_tensors(path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, module, ab = _parse_key(key, config)
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise AdapterIncompatible("the adapter holds no LoRA weights")

    dims = module_dims(config)
    r_default, alpha_default = float(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, module), ab in sorted(pairs.items()):
        name = f"model.layers.{layer}.{'self_attn' if module in _PARENT else 'mlp'}.{module}"
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterIncompatible(f"{name}: {missing} weight is missing")
        a, b = ab["A"], ab["B"]
        for t in (a, b):
            if t.dtype not in _FLOAT_DTYPES:
                raise AdapterIncompatible(f"{name}: dtype {t.dtype} is not a float type")
        in_f, out_f = dims[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
            raise AdapterIncompatible(
                f"{name}: shape mismatch: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                f"the base expects [r, {in_f}] and [{out_f}, r]"
            )
        if not 1 <= r <= max_rank:
            raise AdapterIncompatible(f"{name}: rank {r} is outside 1..{max_rank} (max_lora_rank)")
        r_cfg = _pattern_value(rank_pattern, name, r_default)
        if int(r_cfg) != r:
            raise AdapterIncompatible(
                f"{name}: weights have rank {r}, adapter_config says {r_cfg:g}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterIncompatible(f"{name}: weights contain NaN or Inf")
        alpha = _pattern_value(alpha_pattern, name, alpha_default)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[(layer, module)] = LoraModule(a, (b.double() * scale).to(dtype))
    return _pack(modules, config, dtype, pin_memory)


def _pack(
    modules: dict[tuple[int, str], LoraModule],
    config: ModelConfig,
    dtype: torch.dtype,
    pin_memory: bool,
) -> LoraWeights:
    dims = module_dims(config)
    L = config.num_layers
    groups: dict[str, PackedGroup] = {}
    views: dict[tuple[int, str], LoraModule] = {}
    for g, mods in GROUPS.items():
        mine = {k: m for k, m in modules.items() if k[1] in mods}
        if not mine:
            continue
        r = max(m.rank for m in mine.values())
        offs = [0]
        for m in mods:
            offs.append(offs[-1] + dims[m][1])
        a = torch.zeros(L, len(mods), r, dims[mods[0]][0], dtype=dtype)
        b = torch.zeros(L, offs[-1], r, dtype=dtype)
        ranks = torch.zeros(L, len(mods), dtype=torch.int32)
        if pin_memory:
            a, b, ranks = a.pin_memory(), b.pin_memory(), ranks.pin_memory()
        for (layer, module), m in mine.items():
            p, rk = mods.index(module), m.rank
            a[layer, p, :rk] = m.a
            b[layer, offs[p] : offs[p + 1], :rk] = m.b
            ranks[layer, p] = rk
            views[(layer, module)] = LoraModule(
                a[layer, p, :rk], b[layer, offs[p] : offs[p + 1], :rk]
            )
        groups[g] = PackedGroup(a, b, ranks)
    return LoraWeights(views, groups)
