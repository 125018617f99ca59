"""GPU LoRA slots: which adapter key sits in which slot, pinned while in use. Ints only.

A slot holding an adapter that a running sequence uses is pinned (ref counted); only
unpinned slots are evicted, least recently used first. Writing the weights is the
runner's job: :meth:`SlotTable.assign` only says which slot to write.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._key_of: list[str | None] = [None] * num_slots
        self._slot_of: dict[str, int] = {}
        self._pins = [0] * num_slots
        # unpinned slots, least recently used first; empty slots come before all others
        self._lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))
        self.evictions = 0

    def lookup(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def key_of(self, slot: int) -> str | None:
        return self._key_of[slot]

    @property
    def resident(self) -> list[str]:
        return list(self._slot_of)

    @property
    def num_pinned(self) -> int:
        return sum(1 for p in self._pins if p)

    def can_assign(self) -> bool:
        return bool(self._lru)

    def assign(self, key: str) -> tuple[int, str | None]:
        """Give ``key`` a slot: a free one, else the least recently used unpinned one.

        Returns ``(slot, evicted_key)``. The caller must write the weights before use.
        """
        if key in self._slot_of:
            raise RuntimeError(f"adapter {key!r} already has slot {self._slot_of[key]}")
        if not self._lru:
            raise RuntimeError("every slot is pinned; call can_assign first")
        slot, _ = self._lru.popitem(last=False)
        evicted = self._key_of[slot]
        if evicted is not None:
            del self._slot_of[evicted]
            self.evictions += 1
        self._key_of[slot] = key
        self._slot_of[key] = slot
        self._lru[slot] = None  # unpinned until the caller pins it; most recently used
        return slot, evicted

    def pin(self, slot: int) -> None:
        if self._key_of[slot] is None:
            raise RuntimeError(f"slot {slot} holds no adapter")
        if self._pins[slot] == 0:
            del self._lru[slot]
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise RuntimeError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            self._lru[slot] = None  # most recently used

    def release(self, key: str) -> int | None:
        """Forget ``key`` (its weights failed to write); the slot becomes free."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return None
        if self._pins[slot]:
            raise RuntimeError(f"slot {slot} is pinned")
        self._key_of[slot] = None
        self._lru.pop(slot, None)
        self._lru[slot] = None
        self._lru.move_to_end(slot, last=False)
        return slot

    def is_idle(self) -> bool:
        return not any(self._pins)
