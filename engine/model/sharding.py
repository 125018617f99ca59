"""Tensor-parallel shards of the base model and of LoRA adapters (Megatron / S-LoRA layout).

Rank ``r`` of ``n`` holds: q heads ``[r h/n, (r+1) h/n)`` and the KV heads they read (GQA
groups stay whole), a ``1/n`` slice of the MLP's intermediate columns, and a ``1/n`` slice of
the vocabulary rows of the embedding and the LM head. ``qkv`` and ``gate_up`` are split by
output rows (column-parallel, no communication), ``o`` and ``down`` by input columns
(row-parallel: the rank's partial sums are all-reduced), norms are replicated.

Adapters follow the base layer: on a column-parallel group A ``[r, in]`` is replicated and B
``[out, r]`` split like the base's output; on a row-parallel group A is split like the base's
input and B replicated, so each rank's ``x_r A_r^T B^T`` is a partial sum that rides the base
layer's all-reduce (no collective of its own: ``sum_r (x_r A_r^T) B^T = (x A^T) B^T``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loraplex.engine.lora.weights import GROUPS, LoraWeights, PackedGroup
from loraplex.engine.model.config import ModelConfig, UnsupportedModel

COLUMN_GROUPS = ("qkv", "gate_up")  # split by output
ROW_GROUPS = ("o", "down")  # split by input


@dataclass(frozen=True)
class Shard:
    """Which slice of the model a tensor-parallel rank holds."""

    rank: int
    size: int

    def span(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` (``n`` divisible by ``size``)."""
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Raise one clear line when the model cannot be split ``size`` ways."""
    if size < 1:
        raise UnsupportedModel(f"tensor_parallel_size must be positive, got {size}")
    if config.is_moe and size > 1:
        raise UnsupportedModel(
            "tensor parallelism does not split MoE experts yet: serve it with tensor_parallel_size 1"
        )
    for what, n in (
        ("attention heads", config.num_heads),
        ("KV heads", config.num_kv_heads),
        ("intermediate size", config.intermediate_size),
        ("vocabulary size", config.vocab_size),
    ):
        if n % size:
            raise UnsupportedModel(
                f"tensor_parallel_size {size} does not divide the model's {what} ({n})"
            )


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shape one rank computes with: its heads, KV heads and intermediate columns.
    Hidden size and vocabulary stay whole (the vocabulary split is the model's own)."""
    check_tensor_parallel(config, size)
    if size == 1:
        return config
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // size,
        num_kv_heads=config.num_kv_heads // size,
        intermediate_size=config.intermediate_size // size,
    )


def _rows(t: torch.Tensor, widths: list[int], shard: Shard, dim: int = 0) -> torch.Tensor:
    """Each of the consecutive parts of ``t`` along ``dim`` (``widths``), this rank's slice
    of each, concatenated (a fresh contiguous tensor)."""
    parts, start = [], 0
    for w in widths:
        s = shard.span(w)
        parts.append(t.narrow(dim, start + s.start, s.stop - s.start))
        start += w
    return torch.cat(parts, dim).contiguous()


def qkv_widths(config: ModelConfig) -> list[int]:
    return [config.q_size, config.kv_size, config.kv_size]


def shard_fused(name: str, t: torch.Tensor, config: ModelConfig, shard: Shard) -> torch.Tensor:
    """This rank's slice of one fused base tensor (``LayerWeights``/``LlamaWeights`` names;
    ``config`` is the whole model's)."""
    if shard.size == 1:
        return t
    if name in ("qkv", "qkv_bias"):
        return _rows(t, qkv_widths(config), shard)
    if name == "gate_up":
        return _rows(t, [config.intermediate_size] * 2, shard)
    if name in ("o", "down"):
        return _rows(t, [t.shape[1]], shard, dim=1)
    if name in ("embed", "lm_head"):
        return _rows(t, [config.vocab_size], shard)
    return t  # norms: replicated


def shard_lora(weights: LoraWeights, size: int) -> list[LoraWeights]:
    """Every rank's slice of an adapter read against the whole model (module docstring), in
    rank order. Fresh contiguous tensors, the replicated ones (column-parallel A, row-parallel
    B, the rank tables) one copy shared by all slices; ``buffer`` is empty."""
    if size == 1:
        return [weights]
    shards = [Shard(r, size) for r in range(size)]
    groups: list[dict[str, PackedGroup]] = [{} for _ in shards]
    offsets: dict[str, tuple[int, ...]] = {}
    for g, p in weights.groups.items():
        offs = weights.row_offsets[g]
        ranks = p.ranks.clone()
        if g in COLUMN_GROUPS:
            widths = [offs[i + 1] - offs[i] for i in range(len(GROUPS[g]))]
            a = p.a.clone()
            for s, out in zip(shards, groups, strict=True):
                out[g] = PackedGroup(a, _rows(p.b, widths, s, dim=1), ranks)
            new = [0]
            for w in widths:
                new.append(new[-1] + w // size)
            offsets[g] = tuple(new)
        else:
            b = p.b.clone()
            for s, out in zip(shards, groups, strict=True):
                out[g] = PackedGroup(_rows(p.a, [p.a.shape[3]], s, dim=3), b, ranks)
            offsets[g] = offs
    return [
        LoraWeights(
            groups=gs,
            ranks=dict(weights.ranks),
            buffer=torch.empty(0, dtype=torch.uint8),
            row_offsets=dict(offsets),
        )
        for gs in groups
    ]
