"""The LoRA slot pool: every GPU slot's A and B, per layer and projection group.

Layout (docs/engine-internals.md): per layer and group, ``a[slots, P, max_rank, in]``,
``b[slots, sum(out_p), max_rank]`` (scale folded in), ``ranks[slots, P]`` int32 where 0 means
the adapter in that slot does not touch that projection. The ranks of all layers of a group
live in one ``[L, slots, P]`` tensor so a slot's ranks are written with one copy per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.lora.weights import GROUPS, MODULE_GROUP, LoraWeights, module_dims
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
        self._offsets: dict[str, tuple[int, int]] = {}  # module -> (index p, out offset)
        self._ranks: dict[str, torch.Tensor] = {}
        self.layers: list[dict[str, LoraGroup]] = [{} for _ in range(config.num_layers)]
        for g, mods in GROUPS.items():
            in_f = dims[mods[0]][0]
            off = 0
            for p, m in enumerate(mods):
                self._offsets[m] = (p, off)
                off += dims[m][1]
            P = len(mods)
            ranks = torch.zeros(config.num_layers, num_slots, P, dtype=torch.int32, device=device)
            self._ranks[g] = ranks
            for i in range(config.num_layers):
                a = torch.zeros(num_slots, P, max_rank, in_f, dtype=dtype, device=device)
                b = torch.zeros(num_slots, off, max_rank, dtype=dtype, device=device)
                self.layers[i][g] = LoraGroup(a, b, ranks[i])
        self._num_layers = config.num_layers
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
        """Copy ``weights`` into ``slot`` (non-blocking from pinned host memory on GPU)."""
        self._check_slot(slot)
        if weights.max_rank > self.max_rank:
            raise ValueError(f"adapter rank {weights.max_rank} > pool max rank {self.max_rank}")
        nb = self.device.type == "cuda"
        host_ranks = {
            g: torch.zeros(self._num_layers, len(m), dtype=torch.int32) for g, m in GROUPS.items()
        }
        for (layer, module), mod in weights.modules.items():
            g = MODULE_GROUP[module]
            p, off = self._offsets[module]
            grp = self.layers[layer][g]
            r, out_f = mod.rank, mod.b.shape[0]
            grp.a[slot, p, :r].copy_(mod.a, non_blocking=nb)
            grp.a[slot, p, r:].zero_()
            grp.b[slot, off : off + out_f, :r].copy_(mod.b, non_blocking=nb)
            grp.b[slot, off : off + out_f, r:].zero_()
            host_ranks[g][layer, p] = r
        for g, ranks in self._ranks.items():
            ranks[:, slot].copy_(host_ranks[g])
        self._slot_groups[slot] = frozenset(MODULE_GROUP[m] for _, m in weights.modules)
