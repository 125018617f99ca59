"""GPU adapter residency: which adapter key holds which slot and which pages. Ints only.

Adapter weights live in one arena of GPU memory (``engine/lora/pool.py``) cut into equal
chunks; a chunk is lent to one page class at a time (a projection: q, k, ..., down) and cut
into its pages (``PAGE_ROWS`` rank rows of A and B, all layers). An adapter of rank ``r`` on
a projection holds ``ceil(r / PAGE_ROWS)`` of its pages, so its memory follows its rank, not
the largest rank. A chunk whose pages are all free goes back to the shared list, so any
class can take it.

A *slot* is an adapter's row in the kernels' page table and rank table. An adapter that a
running sequence uses is pinned (ref counted) and never evicted; room for a new one is made
by evicting unpinned adapters, least recently used first. Writing the weights is the
runner's job: :meth:`SlotTable.assign` says which slot and pages to write.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

PageNeed = dict[str, int]  # page class (projection) -> pages


@dataclass(frozen=True)
class PagePlan:
    """How the arena is cut (built by ``LoraPool``; tests build it from ints).

    Offsets and sizes are in granules (the arena's unit, ``LoraPool.GRANULE`` elements)."""

    num_slots: int  # rows of the page table: most adapters resident at once
    num_chunks: int
    chunk_granules: int
    page_granules: dict[str, int]  # page class (projection) -> one page's size
    granule_bytes: int = 0  # bytes of one granule (0: pages of no size, plans built from ints)

    def pages_per_chunk(self, cls: str) -> int:
        return self.chunk_granules // self.page_granules[cls]

    def nbytes(self, need: PageNeed) -> int:
        """Bytes of the arena that ``need`` (pages per class) takes."""
        return sum(n * self.page_granules[m] for m, n in need.items()) * self.granule_bytes


class PageAllocator:
    """Pages of every class out of shared chunks. ``alloc`` returns page offsets (granules)."""

    def __init__(self, plan: PagePlan) -> None:
        self.plan = plan
        for g, pg in plan.page_granules.items():
            if not 0 < pg <= plan.chunk_granules:
                raise ValueError(f"{g}: page of {pg} granules > chunk {plan.chunk_granules}")
        self._free_chunks = list(range(plan.num_chunks - 1, -1, -1))  # pop() gives chunk 0
        self._owner: list[str | None] = [None] * plan.num_chunks
        self._used = [0] * plan.num_chunks
        # class -> chunk -> its free page offsets (only chunks the class owns)
        self._free: dict[str, dict[int, list[int]]] = {g: {} for g in plan.page_granules}
        self._num_free = dict.fromkeys(plan.page_granules, 0)

    @property
    def free_chunks(self) -> int:
        return len(self._free_chunks)

    def pages_used(self) -> int:
        return sum(self._used)

    def chunks_short(self, need: PageNeed) -> int:
        """How many more free chunks ``need`` takes than there are (0: it fits now)."""
        want = 0
        for g, n in need.items():
            more = n - self._num_free[g]
            if more > 0:
                ppc = self.plan.pages_per_chunk(g)
                want += -(-more // ppc)
        return max(0, want - len(self._free_chunks))

    def alloc(self, need: PageNeed) -> dict[str, list[int]]:
        if self.chunks_short(need):
            raise RuntimeError("not enough free pages; evict first")
        out: dict[str, list[int]] = {}
        for g, n in need.items():
            got: list[int] = []
            free = self._free[g]
            while len(got) < n:
                if not free:
                    self._take_chunk(g)
                c = next(iter(free))
                pages = free[c]
                k = min(n - len(got), len(pages))
                got += pages[len(pages) - k :]
                del pages[len(pages) - k :]
                self._used[c] += k
                if not pages:
                    del free[c]
            self._num_free[g] -= n
            out[g] = got
        return out

    def free(self, pages: dict[str, list[int]]) -> None:
        cg = self.plan.chunk_granules
        for g, offs in pages.items():
            free = self._free[g]
            for off in offs:
                c = off // cg
                if self._owner[c] != g or self._used[c] <= 0:
                    raise RuntimeError(f"page {off} of {g} is not allocated")
                free.setdefault(c, []).append(off)
                self._used[c] -= 1
                self._num_free[g] += 1
                if self._used[c] == 0:  # the whole chunk is free: any class may take it
                    self._num_free[g] -= len(free.pop(c))
                    self._owner[c] = None
                    self._free_chunks.append(c)

    def _take_chunk(self, g: str) -> None:
        c = self._free_chunks.pop()
        self._owner[c] = g
        pg, base = self.plan.page_granules[g], c * self.plan.chunk_granules
        n = self.plan.pages_per_chunk(g)
        self._free[g][c] = [base + k * pg for k in range(n - 1, -1, -1)]  # pop order: low first
        self._num_free[g] += n


class SlotTable:
    def __init__(self, plan: PagePlan) -> None:
        self.plan = plan
        self.num_slots = plan.num_slots
        self.pages = PageAllocator(plan)
        self._key_of: list[str | None] = [None] * plan.num_slots
        self._slot_of: dict[str, int] = {}
        self._pages_of: list[dict[str, list[int]]] = [{} for _ in range(plan.num_slots)]
        self._bytes_of = [0] * plan.num_slots  # arena bytes of each slot's pages
        self._pins = [0] * plan.num_slots
        self._free_slots = list(range(plan.num_slots - 1, -1, -1))  # pop() gives slot 0
        # resident, unpinned slots: least recently used first
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0
        # pinned pages per class, pinned pages per chunk, chunks holding pinned pages per class
        self._pinned_pages = dict.fromkeys(plan.page_granules, 0)
        self._chunk_pins = [0] * plan.num_chunks
        self._pinned_chunks = dict.fromkeys(plan.page_granules, 0)

    @classmethod
    def slots_only(cls, num_slots: int) -> SlotTable:
        """A table whose adapters take no pages (scheduler tests): only the slot count binds."""
        return cls(PagePlan(num_slots, 0, 1, {}))

    def lookup(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def key_of(self, slot: int) -> str | None:
        return self._key_of[slot]

    def pages_of(self, slot: int) -> dict[str, list[int]]:
        return self._pages_of[slot]

    def nbytes(self, slots: Iterable[int]) -> int:
        """Arena bytes of the adapters in ``slots`` (their A and B, every layer: what the
        LoRA kernels read of them in a step); an empty slot adds 0. O(len(slots))."""
        b = self._bytes_of
        return sum(b[s] for s in slots)

    @property
    def resident(self) -> list[str]:
        return list(self._slot_of)

    @property
    def num_pinned(self) -> int:
        return sum(1 for p in self._pins if p)

    def fits(self, need: PageNeed) -> bool:
        """Room for ``need`` now, without evicting anything."""
        return bool(self._free_slots) and not self.pages.chunks_short(need)

    def can_assign(self, need: PageNeed) -> bool:
        """Room for ``need`` once every unpinned adapter is evicted (pinned ones stay where
        they are: a chunk holding a pinned page stays lent to its class). O(classes)."""
        if self.fits(need):
            return True
        if not self._free_slots and not self._lru:
            return False
        want = 0
        for m, n in need.items():
            ppc = self.plan.pages_per_chunk(m)
            more = n - (self._pinned_chunks[m] * ppc - self._pinned_pages[m])
            if more > 0:
                want += -(-more // ppc)
        return want <= self.plan.num_chunks - sum(self._pinned_chunks.values())

    def _count_pins(self, slot: int, d: int) -> None:
        """Pinned pages and the chunks that hold them, per class (``d``: +1 pin, -1 unpin)."""
        cg = self.plan.chunk_granules
        for m, offs in self._pages_of[slot].items():
            self._pinned_pages[m] += d * len(offs)
            for off in offs:
                c = off // cg
                before = self._chunk_pins[c]
                self._chunk_pins[c] = before + d
                if (before == 0) != (self._chunk_pins[c] == 0):
                    self._pinned_chunks[m] += d

    def assign(self, key: str, need: PageNeed) -> tuple[int, list[str]]:
        """Give ``key`` a slot and ``need`` pages, evicting unpinned adapters (least recently
        used first) until they fit. -> ``(slot, evicted keys)``. Call ``can_assign`` first."""
        if key in self._slot_of:
            raise RuntimeError(f"adapter {key!r} already has slot {self._slot_of[key]}")
        evicted: list[str] = []
        while not self.fits(need):
            if not self._lru:
                raise RuntimeError("adapter memory is pinned by running work; call can_assign")
            slot, _ = self._lru.popitem(last=False)
            evicted.append(self._forget(slot))
            self.evictions += 1
        slot = self._free_slots.pop()
        self._pages_of[slot] = self.pages.alloc(need)
        self._bytes_of[slot] = self.plan.nbytes(need)
        self._key_of[slot] = key
        self._slot_of[key] = slot
        self._lru[slot] = None  # unpinned until the caller pins it; most recently used
        return slot, evicted

    def _forget(self, slot: int) -> str:
        key = self._key_of[slot]
        if key is None:
            raise RuntimeError(f"slot {slot} holds no adapter")
        self.pages.free(self._pages_of[slot])
        self._pages_of[slot] = {}
        self._bytes_of[slot] = 0
        self._key_of[slot] = None
        del self._slot_of[key]
        self._free_slots.append(slot)
        return key

    def is_pinned(self, slot: int) -> bool:
        return self._pins[slot] > 0

    def pin(self, slot: int) -> None:
        if self._key_of[slot] is None:
            raise RuntimeError(f"slot {slot} holds no adapter")
        if self._pins[slot] == 0:
            del self._lru[slot]
            self._count_pins(slot, +1)
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise RuntimeError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            self._lru[slot] = None  # most recently used
            self._count_pins(slot, -1)

    def release(self, key: str) -> int | None:
        """Forget ``key`` (unloaded, or its weights failed to write): its slot and pages are
        free again. Refused while pinned."""
        slot = self._slot_of.get(key)
        if slot is None:
            return None
        if self._pins[slot]:
            raise RuntimeError(f"slot {slot} is pinned")
        self._lru.pop(slot, None)
        self._forget(slot)
        return slot

    def is_idle(self) -> bool:
        return not any(self._pins)
