"""The LoRA slot pool: every GPU slot's A and B, per layer and projection group.

Layout (docs/engine-internals.md): per layer and group, ``a[slots, P, max_rank, in]``,
``b[slots, sum(out_p), max_rank]`` (scale folded in), ``ranks[slots, P]`` int32 where 0 means
the adapter in that slot does not touch that projection. Each group's tensors hold all
layers (``[L, slots, ...]``; a layer's view is the contracted shape), so writing an adapter
is a few copies per group, not a few per module and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.lora.weights import GROUPS, LoraWeights, module_dims
from engine.model.config import ModelConfig


@dataclass
class LoraGroup:
    a: torch.Tensor  # [slots, P, R, in]
    b: torch.Tensor  # [slots, N, R]
    ranks: torch.Tensor  # [slots, P] int32 (a view into the pool's [L, slots, P])


class LoraPool:
    def __init__(
        self,
        config: ModelConfig,
        *,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = device
        dims = module_dims(config)
        L = config.num_layers
        self._a: dict[str, torch.Tensor] = {}  # [L, slots, P, R, in]
        self._b: dict[str, torch.Tensor] = {}  # [L, slots, N, R]
        self._ranks: dict[str, torch.Tensor] = {}  # [L, slots, P]
        for g, mods in GROUPS.items():
            n_out = sum(dims[m][1] for m in mods)
            P, in_f = len(mods), dims[mods[0]][0]
            self._a[g] = torch.zeros(L, num_slots, P, max_rank, in_f, dtype=dtype, device=device)
            self._b[g] = torch.zeros(L, num_slots, n_out, max_rank, dtype=dtype, device=device)
            self._ranks[g] = torch.zeros(L, num_slots, P, dtype=torch.int32, device=device)
        self.layers: list[dict[str, LoraGroup]] = [
            {g: LoraGroup(self._a[g][i], self._b[g][i], self._ranks[g][i]) for g in GROUPS}
            for i in range(L)
        ]
        self._slot_groups: list[frozenset[str]] = [frozenset()] * num_slots

    def groups_used(self, slots: set[int]) -> frozenset[str]:
        """The projection groups that the adapters in ``slots`` touch (host bookkeeping)."""
        out: frozenset[str] = frozenset()
        for s in slots:
            if s >= 0:
                out |= self._slot_groups[s]
        return out

    def nbytes(self) -> int:
        n = 0
        for groups in self.layers:
            for grp in groups.values():
                n += grp.a.numel() * grp.a.element_size() + grp.b.numel() * grp.b.element_size()
        return n

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"LoRA slot {slot} out of range [0, {self.num_slots})")

    def clear(self, slot: int) -> None:
        """The slot no longer holds an adapter: every projection reads as rank 0."""
        self._check_slot(slot)
        for ranks in self._ranks.values():
            ranks[:, slot].zero_()
        self._slot_groups[slot] = frozenset()

    def write(self, slot: int, weights: LoraWeights) -> None:
        """Copy ``weights`` into ``slot``: a few copies per group (non-blocking from pinned
        host memory on GPU); rows past the adapter's rank are zeroed."""
        self._check_slot(slot)
        if weights.max_rank > self.max_rank:
            raise ValueError(f"adapter rank {weights.max_rank} > pool max rank {self.max_rank}")
        nb = self.device.type == "cuda"
        for g in GROUPS:
            packed = weights.groups.get(g)
            if packed is None:
                self._ranks[g][:, slot].zero_()
                continue
            r = packed.a.shape[2]
            self._a[g][:, slot, :, :r].copy_(packed.a, non_blocking=nb)
            self._a[g][:, slot, :, r:].zero_()
            self._b[g][:, slot, :, :r].copy_(packed.b, non_blocking=nb)
            self._b[g][:, slot, :, r:].zero_()
            self._ranks[g][:, slot].copy_(packed.ranks, non_blocking=nb)
        self._slot_groups[slot] = frozenset(weights.groups)
