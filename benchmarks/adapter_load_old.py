"""The adapter read path as it was before the one-copy loader (kept to measure against).

``read_adapter_old`` is the engine's ``read_adapter`` up to commit 0dbecab: ``load_file``
(a copy of every tensor), a Python loop per module with its own NaN/Inf pass and a float64
round trip for the scale, then a second copy into freshly zeroed packed tensors and a third
into pinned memory. ``bench_adapter_scale`` times it beside the new path in the same run;
``tests/engine/test_adapter_read_parity.py`` checks the two agree, weights and errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.engine.errors import AdapterIncompatible, AdapterLoadError
from loraplex.engine.lora.weights import (
    _FLOAT_DTYPES,
    _PARENT,
    GROUPS,
    LoraModule,
    PackedGroup,
    _check_config,
    _parse_key,
    _pattern_value,
    _read_config,
    module_dims,
)
from loraplex.engine.model.config import ModelConfig


@dataclass(frozen=True)
class OldLoraWeights:
    modules: dict[tuple[int, str], LoraModule]
    groups: dict[str, PackedGroup]


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


def read_adapter_old(
    path: Path,
    config: ModelConfig,
    *,
    max_rank: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> OldLoraWeights:
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
) -> OldLoraWeights:
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
    return OldLoraWeights(views, groups)
