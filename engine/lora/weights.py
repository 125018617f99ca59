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
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from loraplex.engine.errors import AdapterIncompatible, AdapterLoadError
from loraplex.engine.lora.safetensors_file import (
    CACHED_HEADER_BYTES,
    SafetensorsError,
    SafetensorsFile,
    TensorEntry,
    open_safetensors,
)
from loraplex.engine.model.config import ModelConfig

# projection groups of the slot pool, in concatenation order (docs/engine-internals.md)
ALL_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
    # Qwen3-MoE: each expert's projections; a group's "layers" are (layer, expert) rows
    "experts_gate_up": ("experts.gate_proj", "experts.up_proj"),
    "experts_down": ("experts.down_proj",),
}
DENSE_GROUPS = ("qkv", "o", "gate_up", "down")
MOE_GROUPS = ("qkv", "o", "experts_gate_up", "experts_down")
# the dense models' groups (what the Llama-family tools and benchmarks iterate)
GROUPS = {g: ALL_GROUPS[g] for g in DENSE_GROUPS}
MODULE_GROUP = {m: g for g, mods in GROUPS.items() for m in mods}
ALL_MODULE_GROUP = {m: g for g, mods in ALL_GROUPS.items() for m in mods}
# Phi-3's fused modules: one A shared by the parts, B's rows split across them (exact)
FUSED = {"qkv_proj": GROUPS["qkv"], "gate_up_proj": GROUPS["gate_up"]}
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "qkv_proj": "self_attn",
}
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(?:experts\.(\d+)\.)?(\w+)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def groups_of(config: ModelConfig) -> tuple[str, ...]:
    """The projection groups of this model's layers (MoE: attention and the experts)."""
    return MOE_GROUPS if config.is_moe else DENSE_GROUPS


def group_rows(config: ModelConfig, group: str) -> int:
    """Rows of a group's packed tensors: one per layer, or per (layer, expert) for the
    experts (row ``layer * E + expert``)."""
    return config.num_layers * (config.num_experts if group.startswith("experts_") else 1)


def module_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) in the base model (fused ones too; an
    expert module's are one expert's)."""
    h, i, mi = config.hidden_size, config.intermediate_size, config.moe_intermediate_size
    return {
        "experts.gate_proj": (h, mi),
        "experts.up_proj": (h, mi),
        "experts.down_proj": (mi, h),
        "q_proj": (h, config.q_size),
        "k_proj": (h, config.kv_size),
        "v_proj": (h, config.kv_size),
        "o_proj": (config.q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
        "qkv_proj": (h, config.q_size + 2 * config.kv_size),
        "gate_up_proj": (h, 2 * i),
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
    """One adapter on the host: its packed groups, all views of one flat ``buffer`` (pinned
    when the engine runs on a GPU), and each ``(layer, module)``'s rank."""

    groups: dict[str, PackedGroup]
    ranks: dict[tuple[int, str], int]
    buffer: torch.Tensor  # uint8: every byte of this adapter's host memory
    row_offsets: dict[str, tuple[int, ...]]  # group -> each module's first row in ``b``

    @cached_property
    def modules(self) -> dict[tuple[int, str], LoraModule]:
        """``(layer, module) -> LoraModule``, views into ``groups`` (tests and tools)."""
        out = {}
        for (layer, module), rk in sorted(self.ranks.items()):
            g = ALL_MODULE_GROUP[module]
            p = ALL_GROUPS[g].index(module)
            lo, hi = self.row_offsets[g][p], self.row_offsets[g][p + 1]
            packed = self.groups[g]
            out[(layer, module)] = LoraModule(packed.a[layer, p, :rk], packed.b[layer, lo:hi, :rk])
        return out

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(m for _, m in self.ranks)

    def nbytes(self) -> int:
        """Bytes of the packed weights (what a slot write copies)."""
        return self.buffer.numel()

    def host_bytes(self) -> int:
        """Host memory this adapter holds. Pinned memory comes from torch's caching host
        allocator, which rounds each block up to a power of two: that is what it holds."""
        n = self.buffer.numel()
        return 1 << (n - 1).bit_length() if self.buffer.is_pinned() else n


def random_lora_weights(
    config: ModelConfig,
    rank: int,
    dtype: torch.dtype,
    *,
    groups: tuple[str, ...] | None = None,
    seed: int = 0,
    std: float = 0.02,
    device: torch.device | str = "cpu",
) -> LoraWeights:
    """An adapter of rank ``rank`` on every projection of ``groups`` (default: all of the
    model's) with normal random A and B, built on ``device``, no file. For what needs an
    adapter's shape and bytes, not its values: the warm-up's launch-config tuning, which
    times the decode graphs with adapters in many slots (written from device memory)."""
    gen = torch.Generator().manual_seed(seed)
    dims = module_dims(config)
    packed: dict[str, PackedGroup] = {}
    ranks: dict[tuple[int, str], int] = {}
    rows: dict[str, tuple[int, ...]] = {}
    for g in groups or groups_of(config):
        mods = ALL_GROUPS[g]
        L, in_f = group_rows(config, g), dims[mods[0]][0]
        offs = [0]
        for m in mods:
            offs.append(offs[-1] + dims[m][1])
        a = (torch.randn(L, len(mods), rank, in_f, generator=gen) * std).to(device, dtype)
        b = (torch.randn(L, offs[-1], rank, generator=gen) * std).to(device, dtype)
        rk = torch.full((L, len(mods)), rank, dtype=torch.int32, device=device)
        packed[g] = PackedGroup(a, b, rk)
        rows[g] = tuple(offs)
        for layer in range(config.num_layers):
            for m in mods:
                ranks[(layer, m)] = rank
    return LoraWeights(packed, ranks, torch.empty(0, dtype=torch.uint8), rows)


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


def _parse_key(key: str, config: ModelConfig) -> tuple[int, str, str]:
    """-> (row, module, "A" | "B"); the row is the layer, or ``layer * E + expert`` for an
    expert's projection (module ``experts.<proj>``)."""
    if "magnitude" in key:
        raise AdapterIncompatible(f"tensor {key!r}: DoRA magnitude vectors are not supported")
    m = _KEY.match(key)
    if m is None:
        raise AdapterIncompatible(f"tensor {key!r} is not a LoRA A/B weight of a decoder layer")
    layer, parent, module, ab = int(m[1]), m[2], m[4], m[5]
    row = layer
    if m[3] is not None:
        module, expert = f"experts.{module}", int(m[3])
        if module in config.adapter_modules and expert >= config.num_experts:
            raise AdapterIncompatible(
                f"tensor {key!r}: expert {expert} does not exist (base has {config.num_experts})"
            )
        row = layer * config.num_experts + expert
    if module not in config.adapter_modules or parent != _PARENT.get(module, "mlp"):
        raise AdapterIncompatible(
            f"tensor {key!r}: module {parent}.{module} does not exist in the base model "
            f"(supported: {', '.join(config.adapter_modules)})"
        )
    if layer >= config.num_layers:
        raise AdapterIncompatible(
            f"tensor {key!r}: layer {layer} does not exist (base has {config.num_layers})"
        )
    return row, module, ab


def _module_name(config: ModelConfig, row: int, module: str) -> str:
    if module.startswith("experts."):
        layer, expert = divmod(row, config.num_experts)
        return f"model.layers.{layer}.mlp.experts.{expert}.{module.removeprefix('experts.')}"
    return f"model.layers.{row}.{'self_attn' if module in _PARENT else 'mlp'}.{module}"


@dataclass(frozen=True)
class _Module:
    """One (layer, module) of the adapter, checked against the base: where its A and B
    lie in the file, its rank and its scale."""

    layer: int
    module: str
    name: str
    a: TensorEntry
    b: TensorEntry
    rank: int
    scale: float


def _open_file(path: Path) -> SafetensorsFile:
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise AdapterIncompatible(
                f"{pickles[0]} is a pickle file, which is never loaded; "
                "save the adapter as adapter_model.safetensors"
            )
        raise AdapterLoadError(f"adapter_model.safetensors not found in {path}")
    try:
        return open_safetensors(st)
    except (SafetensorsError, OSError, ValueError) as e:
        raise AdapterLoadError(f"adapter_model.safetensors could not be read: {e}") from e


def read_adapter(
    path: Path,
    config: ModelConfig,
    *,
    max_rank: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> LoraWeights:
    """Read and validate the PEFT adapter at ``path``; host tensors in ``dtype``, scale folded.

    The file is mapped, not read; every check that needs no tensor data runs first (from the
    header); NaN/Inf are found with one min/max over the stored weights; then each
    projection group is packed with one copy (a ``cat`` of views of the mapping into the
    adapter's one flat buffer, converting the dtype) and its scale folded in place. Errors
    name the same module, with the same message, as a module-by-module check would.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    cfg = _read_config(path)
    _check_config(cfg)
    st = _open_file(path)
    # the plan is a function of the header, the config, the base and max_rank alone: an
    # adapter laid out as one read before (same base, rank and targets) reuses its plan
    cacheable = 0 < len(st.header) <= CACHED_HEADER_BYTES
    key = (st.header, json.dumps(cfg, sort_keys=True), config, max_rank)
    mods = _PLANS.get(key) if cacheable else None
    if mods is None:
        pairs: dict[tuple[int, str], dict[str, TensorEntry]] = {}
        for e in st.entries:  # offset order, the order safetensors' load_file gives
            layer, module, ab = _parse_key(e.name, config)
            pairs.setdefault((layer, module), {})[ab] = e
        if not pairs:
            raise AdapterIncompatible("the adapter holds no LoRA weights")
        mods = _plan(st, pairs, cfg, config, max_rank)
        if cacheable:
            _PLANS.put(key, mods)
    if not _all_finite(st):
        _raise_first_nonfinite(st, mods)
    return _pack(st, mods, config, dtype, pin_memory)


class _PlanCache:
    """The plans of the last ``size`` adapter layouts (thread-safe: the loader's workers
    read adapters side by side). Only plans that passed every check are kept."""

    def __init__(self, size: int = 64):
        self.size = size
        self.items: OrderedDict[tuple, list[_Module]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> list[_Module] | None:
        with self.lock:
            mods = self.items.get(key)
            if mods is not None:
                self.items.move_to_end(key)
            return mods

    def put(self, key: tuple, mods: list[_Module]) -> None:
        with self.lock:
            self.items[key] = mods
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_PLANS = _PlanCache()


def _plan(
    st: SafetensorsFile,
    pairs: dict[tuple[int, str], dict[str, TensorEntry]],
    cfg: dict[str, Any],
    config: ModelConfig,
    max_rank: int,
) -> list[_Module]:
    """Every check that needs only the header, module by module in (layer, module) order.
    A module that fails raises, unless an earlier module holds NaN/Inf (that error first)."""
    dims = module_dims(config)
    r_default, alpha_default = float(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    mods: list[_Module] = []
    for (layer, module), ab in sorted(pairs.items()):
        name = _module_name(config, layer, module)
        try:
            mods += _split(
                _check_module(
                    layer, module, name, ab, dims[module], max_rank,
                    _pattern_value(rank_pattern, name, r_default),
                    _pattern_value(alpha_pattern, name, alpha_default),
                    rslora,
                ),
                dims,
            )  # fmt: skip
        except AdapterIncompatible:
            _raise_first_nonfinite(st, mods)
            raise
    return mods


def _check_module(
    layer: int,
    module: str,
    name: str,
    ab: dict[str, TensorEntry],
    dims: tuple[int, int],
    max_rank: int,
    r_cfg: float,
    alpha: float,
    rslora: bool,
) -> _Module:
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise AdapterIncompatible(f"{name}: {missing} weight is missing")
    a, b = ab["A"], ab["B"]
    for t in (a, b):
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterIncompatible(f"{name}: dtype {t.dtype} is not a float type")
    in_f, out_f = dims
    r = a.shape[0] if len(a.shape) == 2 else -1
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
        raise AdapterIncompatible(
            f"{name}: shape mismatch: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
            f"the base expects [r, {in_f}] and [{out_f}, r]"
        )
    if not 1 <= r <= max_rank:
        raise AdapterIncompatible(f"{name}: rank {r} is outside 1..{max_rank} (max_lora_rank)")
    if int(r_cfg) != r:
        raise AdapterIncompatible(f"{name}: weights have rank {r}, adapter_config says {r_cfg:g}")
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return _Module(layer, module, name, a, b, r, scale)


def _split(m: _Module, dims: dict[str, tuple[int, int]]) -> list[_Module]:
    """A fused module (Phi-3's ``qkv_proj``, ``gate_up_proj``) as its parts: each the same
    A and a slice of B's rows (rows are contiguous, so each slice is an entry of the file)."""
    parts = FUSED.get(m.module)
    if parts is None:
        return [m]
    out, lo, row = [], 0, m.rank * m.b.dtype.itemsize
    for part in parts:
        n = dims[part][1]
        b = TensorEntry(
            f"{m.b.name}[{lo}:{lo + n}]", m.b.dtype, (n, m.rank),
            m.b.begin + lo * row, m.b.begin + (lo + n) * row,
        )  # fmt: skip
        out.append(_Module(m.layer, part, m.name, m.a, b, m.rank, m.scale))
        lo += n
    return out


def _raise_first_nonfinite(st: SafetensorsFile, mods: list[_Module]) -> None:
    """The error path only: the first module (in order) whose stored weights hold NaN/Inf."""
    for m in mods:
        if not all(torch.isfinite(st.view(e)).all() for e in (m.a, m.b)):
            raise AdapterIncompatible(f"{m.name}: weights contain NaN or Inf")


def _all_finite(st: SafetensorsFile) -> bool:
    """NaN and Inf survive min and max. Every tensor in the file is a LoRA weight by now, so
    when they share a dtype the whole data region is one reduction; else one per tensor."""
    if st.data.numel() == 0:
        return True
    dtypes = {e.dtype for e in st.entries}
    if len(dtypes) == 1 and st.data.storage_offset() % next(iter(dtypes)).itemsize == 0:
        parts = [st.data.view(next(iter(dtypes)))]
    else:
        parts = [st.view(e) for e in st.entries]
    for t in parts:
        lo, hi = torch.aminmax(t)
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            return False
    return True


class _BufferPool:
    """The flat buffers of pageable host adapters that were dropped, kept for the next read
    of the same size. A fresh buffer of an adapter's size is fresh pages (glibc maps large
    blocks and unmaps them on free): the first write to each page faults, ~2,900 faults and
    over half of the reader's time for a SmolLM2 rank-16 adapter. A host cache that
    evicts to make room (thousands of adapters, the same layout) hands its buffers on here.

    A buffer is taken again only when nothing else refers to its memory (no view of the
    dropped adapter survives). Pinned buffers never come here: torch's caching host
    allocator recycles them, after the copies that read them have finished."""

    def __init__(self, max_buffers: int = 4, max_bytes: int = 256 << 20):
        self.max_buffers, self.max_bytes = max_buffers, max_bytes
        self.free: list[torch.Tensor] = []  # oldest first
        # reentrant: a collection inside take() may finalize a dropped adapter (give())
        self.lock = threading.RLock()
        self.reused = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            for b in list(self.free):
                if b.numel() == nbytes and _sole_owner(b):
                    self.free = [x for x in self.free if x is not b]
                    self.reused += 1
                    return b
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        if buf.numel() > self.max_bytes:
            return
        with self.lock:
            self.free.append(buf)
            while len(self.free) > self.max_buffers or (
                sum(b.numel() for b in self.free) > self.max_bytes
            ):
                self.free.pop(0)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    assert _STORAGE_USE_COUNT is not None
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)


# what a tensor that alone owns its memory reads (the count includes torch's own handle);
# a torch without the count reuses nothing
_SOLE = _use_count(torch.empty(1)) if _STORAGE_USE_COUNT is not None else -1


def _sole_owner(t: torch.Tensor) -> bool:
    return _STORAGE_USE_COUNT is not None and _use_count(t) <= _SOLE


_BUFFERS = _BufferPool()


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def _pack(
    st: SafetensorsFile,
    mods: list[_Module],
    config: ModelConfig,
    dtype: torch.dtype,
    pin_memory: bool,
) -> LoraWeights:
    dims = module_dims(config)
    by_group: dict[str, list[_Module]] = {}
    for m in mods:
        by_group.setdefault(ALL_MODULE_GROUP[m.module], []).append(m)
    # layout of the one flat buffer: per group A, B, ranks (64-byte aligned)
    elem = dtype.itemsize
    plan: list[tuple[str, int, tuple[int, ...], int]] = []  # group, rank, row offsets, start
    total = 0
    for g, mods_g in by_group.items():
        r = max(m.rank for m in mods_g)
        offs = [0]
        for mod in ALL_GROUPS[g]:
            offs.append(offs[-1] + dims[mod][1])
        P, in_f, L = len(ALL_GROUPS[g]), dims[ALL_GROUPS[g][0]][0], group_rows(config, g)
        plan.append((g, r, tuple(offs), total))
        total += _align(L * P * r * in_f * elem) + _align(L * offs[-1] * r * elem)
        total += _align(L * P * 4)
    if pin_memory:
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    else:
        buf = _BUFFERS.take(total)
    flat = st.flat_views()  # every tensor's 1-D view in one call (one dtype: the usual case)
    groups: dict[str, PackedGroup] = {}
    ranks: dict[tuple[int, str], int] = {}
    for g, r, offs, start in plan:
        mods_g = by_group[g]
        P, in_f, L = len(ALL_GROUPS[g]), dims[ALL_GROUPS[g][0]][0], group_rows(config, g)
        na, nb = L * P * r * in_f * elem, L * offs[-1] * r * elem
        sa, sb = start + _align(na), start + _align(na) + _align(nb)
        a = buf[start : start + na].view(dtype).view(L, P, r, in_f)
        b = buf[sa : sa + nb].view(dtype).view(L, offs[-1], r)
        rk = buf[sb : sb + L * P * 4].view(torch.int32).view(L, P)
        table = [0] * (L * P)
        for m in mods_g:
            p = ALL_GROUPS[g].index(m.module)
            table[m.layer * P + p] = m.rank
            ranks[(m.layer, m.module)] = m.rank
        rk.copy_(torch.tensor(table, dtype=torch.int32).view(L, P))
        _fill(st, mods_g, g, r, offs, a, b, flat, full=all(x == r for x in table))
        _fold_scale(mods_g, g, offs, b)
        groups[g] = PackedGroup(a, b, rk)
    row_offsets = {g: offs for g, _, offs, _ in plan}
    weights = LoraWeights(groups, ranks, buf, row_offsets)
    if not pin_memory:
        weakref.finalize(weights, _BUFFERS.give, buf)
    return weights


def _fill(
    st: SafetensorsFile,
    mods: list[_Module],
    g: str,
    r: int,
    offs: tuple[int, ...],
    a: torch.Tensor,
    b: torch.Tensor,
    flat: dict[str, torch.Tensor] | None,
    *,
    full: bool,
) -> None:
    """Copy the group's A and B from the mapping into the packed tensors (with the dtype
    conversion). ``full``: every layer holds every module of the group at rank ``r``, so
    the packed A and B are the sources concatenated in (layer, module) order: one ``cat``."""
    order = sorted(mods, key=lambda m: (m.layer, ALL_GROUPS[g].index(m.module)))
    if full:
        if flat is None:
            flat = {e.name: st.view(e).view(-1) for m in order for e in (m.a, m.b)}
        torch.cat([flat[m.a.name] for m in order], out=a.view(-1))
        # a fused module's B slices are no entries of the file: cut from the mapping
        bs = [flat.get(m.b.name) for m in order]
        torch.cat(
            [st.view(m.b).view(-1) if t is None else t for m, t in zip(order, bs, strict=True)],
            out=b.view(-1),
        )
        return
    a.zero_()
    b.zero_()
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for m in order:
        p = ALL_GROUPS[g].index(m.module)
        dst += [a[m.layer, p, : m.rank], b[m.layer, offs[p] : offs[p + 1], : m.rank]]
        src += [st.view(m.a), st.view(m.b)]
    torch._foreach_copy_(dst, src)


def _fold_scale(mods: list[_Module], g: str, offs: tuple[int, ...], b: torch.Tensor) -> None:
    scales = {m.scale for m in mods}
    if len(scales) == 1:
        (s,) = scales
        if s != 1.0:
            b.mul_(s)
        return
    views, factors = [], []
    for m in mods:
        p = ALL_GROUPS[g].index(m.module)
        views.append(b[m.layer, offs[p] : offs[p + 1]])
        factors.append(m.scale)
    torch._foreach_mul_(views, factors)
