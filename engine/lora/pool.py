"""The LoRA page pool: every resident adapter's A and B in pages of rank rows, in one arena.

Layout (docs/engine-internals.md): one flat GPU tensor (the arena) of ``budget`` bytes, cut
into chunks, each chunk lent to one projection (q, k, v, o, gate, up, down) and cut into
that projection's pages (``engine/lora/slots.py`` decides which). A page of projection ``m``
holds ``PAGE_ROWS`` rank rows of every layer: ``A[L, PAGE_ROWS, in]`` then
``B[L, out, PAGE_ROWS]`` (scale folded in). An adapter of rank ``r`` on ``m`` holds
``ceil(r / PAGE_ROWS)`` pages of it, listed in rank order in its row of the group's page
table ``pages[slots, P, max_rank / PAGE_ROWS]`` int32 (page offsets in granules of
``GRANULE`` elements); ``ranks[L, slots, P]`` int32 (0: that projection or layer is not in
the adapter). A projection the adapter leaves alone costs nothing.

The kernels see, per layer and projection group, strided views ``a[U, P, PAGE_ROWS, in]``
(stride 0 over P: every projection's rows start at its own page) and ``b[U, N, PAGE_ROWS]``
whose first index is a granule offset, plus ``b_offsets[P]`` (ints: where projection p's
B of this layer sits in its page, less its first output column): row ``r`` of slot ``s``,
projection ``p`` is ``a[pages[s, p, r // PAGE_ROWS], p, r % PAGE_ROWS]``.

Writes go on a side stream (CUDA): the host-to-device copy of the adapter starts at once; the
copy into its pages and tables waits for the steps already queued (they may still read pages
this write reuses), and the main stream waits for the write before the next step. The host
never waits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.lora.slots import PageAllocator, PageNeed, PagePlan
from loraplex.engine.lora.weights import (
    ALL_GROUPS,
    LoraWeights,
    group_rows,
    groups_of,
    module_dims,
)
from loraplex.engine.model.config import ModelConfig

PAGE_ROWS = 8  # rank rows per page: ranks 8, 16, 32, 64 take exactly their bytes
GRANULE = 64  # elements; page offsets are multiples of it (128 B rows in 16-bit dtypes)
CHUNK_PAGES = 16  # a chunk holds this many pages of the largest projection (budget allowing)
MIN_CHUNKS = 32  # ... but the arena is cut into at least this many chunks
DEFAULT_MAX_SLOTS = 4096  # page-table rows when no cap is given


@dataclass
class LoraGroup:
    """One layer's view of one projection group (what the kernels read)."""

    a: torch.Tensor  # [U, P, PAGE_ROWS, in] strided view of the arena, U = granule offsets
    b: torch.Tensor  # [U, N, PAGE_ROWS]
    ranks: torch.Tensor  # [slots, P] int32
    pages: torch.Tensor  # [slots, P, max_rank // PAGE_ROWS] int32 granule offsets
    b_offsets: list[int]  # [P] where projection p's B of this layer sits (elements)
    # the experts' groups: B's own page table (rows ``slot * E + expert``, each page offset
    # moved to that expert's B rows; ``pages`` to its A rows); None: ``pages`` serves both
    b_pages: torch.Tensor | None = None

    @property
    def b_table(self) -> torch.Tensor:
        """The page table the expand reads B through: ``b_pages``, else ``pages``."""
        return self.b_pages if self.b_pages is not None else self.pages

    @property
    def width(self) -> int:
        """The pool's rank: each slot's pages x PAGE_ROWS (what the per-token kernels size
        their tiles by, and the decode LoRA's launch-config keys name)."""
        return self.pages.shape[2] * self.a.shape[2]


def _modules(config: ModelConfig) -> list[str]:
    """The page classes: every projection of the model's groups."""
    return [m for g in groups_of(config) for m in ALL_GROUPS[g]]


def _rows(config: ModelConfig, m: str) -> int:
    return group_rows(config, "experts_" if m.startswith("experts.") else "")


def _page_elems(config: ModelConfig, m: str) -> int:
    in_f, out_f = module_dims(config)[m]
    return _rows(config, m) * PAGE_ROWS * (in_f + out_f)


def page_bytes(config: ModelConfig, elem_size: int) -> dict[str, int]:
    """Bytes of one page per projection (before rounding to granules)."""
    return {m: _page_elems(config, m) * elem_size for m in _modules(config)}


def plan_pages(
    config: ModelConfig, budget_bytes: int, elem_size: int, max_slots: int | None = None
) -> PagePlan:
    """Cut ``budget_bytes`` into chunks and pages (see the module docstring)."""
    pg = {m: -(-_page_elems(config, m) // GRANULE) for m in _modules(config)}
    biggest = max(pg.values())
    total = budget_bytes // (GRANULE * elem_size)
    if total < biggest:
        raise ValueError(
            f"LoRA memory budget of {budget_bytes} bytes is smaller than one page "
            f"({biggest * GRANULE * elem_size} bytes)"
        )
    chunk = max(biggest, min(CHUNK_PAGES * biggest, total // MIN_CHUNKS))
    num_chunks = total // chunk
    fit = num_chunks * max(chunk // p for p in pg.values())  # most single-page adapters
    slots = min(fit, max_slots if max_slots is not None else DEFAULT_MAX_SLOTS)
    return PagePlan(
        num_slots=slots,
        num_chunks=num_chunks,
        chunk_granules=chunk,
        page_granules=pg,
        granule_bytes=GRANULE * elem_size,
    )


def page_need(weights: LoraWeights) -> PageNeed:
    """Pages of each projection that ``weights`` takes: ``ceil(rank / PAGE_ROWS)`` (its
    largest rank over the layers); projections it leaves alone take none."""
    need = {}
    for g, packed in weights.groups.items():
        for p, r in enumerate(packed.ranks.max(dim=0).values.tolist()):
            if r > 0:
                need[ALL_GROUPS[g][p]] = -(-int(r) // PAGE_ROWS)
    return need


class LoraPool:
    def __init__(
        self,
        config: ModelConfig,
        *,
        budget_bytes: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.max_rank = max_rank
        self.max_pages = -(-max_rank // PAGE_ROWS)
        elem = torch.empty((), dtype=dtype).element_size()
        self.plan = plan_pages(config, budget_bytes, elem, max_slots)
        self.num_slots = self.plan.num_slots
        L = self.num_layers = config.num_layers
        used = self.plan.num_chunks * self.plan.chunk_granules * GRANULE
        dims = module_dims(config)
        self._dims = dims
        self._rows = {m: _rows(config, m) for m in _modules(config)}
        self._groups = groups_of(config)
        # g -> P, in, out offsets, rows per layer (experts: E)
        self._shape: dict[str, tuple[int, int, list[int], int]] = {}
        tail = 0  # the views reach past the last page's start
        for g in self._groups:
            mods = ALL_GROUPS[g]
            offs = [0]
            for m in mods:
                offs.append(offs[-1] + dims[m][1])
            per = group_rows(config, g) // L
            self._shape[g] = (len(mods), dims[mods[0]][0], offs, per)
            tail = max(tail, L * per * PAGE_ROWS * (dims[mods[0]][0] + offs[-1]))
        self.arena = torch.zeros(used + tail, dtype=dtype, device=device)
        units = self.plan.num_chunks * self.plan.chunk_granules
        self._ranks: dict[str, torch.Tensor] = {}  # [L, slots, per, P]
        self._pages: dict[str, torch.Tensor] = {}  # [slots, P, max_pages]
        # the experts' groups: page tables per (slot, expert), to its A and to its B rows
        self._vpages: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: list[dict[str, LoraGroup]] = [{} for _ in range(L)]
        S = self.num_slots
        for g, (P, in_f, offs, per) in self._shape.items():
            n = offs[-1]
            self._ranks[g] = torch.zeros(L, S, per, P, dtype=torch.int32, device=device)
            self._pages[g] = torch.zeros(S, P, self.max_pages, dtype=torch.int32, device=device)
            vp = None
            if per > 1:
                vp = tuple(
                    torch.zeros(S, per, P, self.max_pages, dtype=torch.int32, device=device)
                    for _ in range(2)
                )
                self._vpages[g] = vp
            b_start = L * per * PAGE_ROWS * in_f  # every page: A of all rows, then B
            for i in range(L):
                a = self.arena.as_strided(
                    (units, P, PAGE_ROWS, in_f), (GRANULE, 0, in_f, 1), i * per * PAGE_ROWS * in_f
                )
                b = self.arena.as_strided((units, n, PAGE_ROWS), (GRANULE, PAGE_ROWS, 1), b_start)
                # projection p's B of layer i: at i * out_p rows into its page's B, and the
                # kernels address it by the group's output column (from offs[p]); an
                # expert's rows further on, through its own page table
                b_offs = [
                    (i * per * (offs[p + 1] - offs[p]) - offs[p]) * PAGE_ROWS for p in range(P)
                ]
                ranks = self._ranks[g][i].view(S * per, P)
                if vp is None:
                    self.layers[i][g] = LoraGroup(a, b, ranks, self._pages[g], b_offs)
                else:
                    va, vb = (t.view(S * per, P, self.max_pages) for t in vp)
                    self.layers[i][g] = LoraGroup(a, b, ranks, va, b_offs, b_pages=vb)
        # per slot, the groups its adapter touches -> its largest rank there (host ints)
        self._slot_ranks: list[dict[str, int]] = [{} for _ in range(self.num_slots)]
        # pages for writes that name none (a runner used without an engine: tests, benches)
        self._own: PageAllocator | None = None
        self._own_pages: dict[int, dict[str, list[int]]] = {}
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def ranks_used(self, slots: set[int]) -> dict[str, int]:
        """The projection groups that the adapters in ``slots`` touch -> the largest rank
        among them there, over layers and projections (host bookkeeping: the segment-path
        kernels size their work by it, ``lora_shrink``'s ``max_rank``)."""
        out: dict[str, int] = {}
        for s in slots:
            if s >= 0:
                for g, r in self._slot_ranks[s].items():
                    out[g] = max(out.get(g, 0), r)
        return out

    def nbytes(self) -> int:
        """GPU bytes of adapter weights (the arena; the page and rank tables not counted)."""
        return self.arena.numel() * self.arena.element_size()

    def staging_bytes(self) -> int:
        """Device bytes one write stages: the largest adapter this pool takes."""
        elem = self.arena.element_size()
        per_row = sum(per * (P * in_f + offs[-1]) for P, in_f, offs, per in self._shape.values())
        return self.num_layers * per_row * self.max_rank * elem

    def page_need(self, weights: LoraWeights) -> PageNeed:
        return page_need(weights)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"LoRA slot {slot} out of range [0, {self.num_slots})")

    def _page_views(self, m: str, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The A ``[L, PAGE_ROWS, in]`` and B ``[L, out, PAGE_ROWS]`` of projection ``m``'s
        page at ``off``."""
        in_f, out_f = self._dims[m]
        L, base = self._rows[m], off * GRANULE
        a_n = L * PAGE_ROWS * in_f
        a = self.arena[base : base + a_n].view(L, PAGE_ROWS, in_f)
        b = self.arena[base + a_n : base + a_n + L * out_f * PAGE_ROWS].view(L, out_f, PAGE_ROWS)
        return a, b

    def read_page(self, m: str, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one page's A and B (tests: what GPU memory holds)."""
        a, b = self._page_views(m, off)
        return a.clone(), b.clone()

    def clear(self, slot: int) -> None:
        """The slot no longer holds an adapter: every projection reads as rank 0 (queued
        after the steps in flight on the current stream)."""
        self._check_slot(slot)
        for g in self._groups:
            self._ranks[g][:, slot].zero_()
            self._pages[g][slot].zero_()
            for t in self._vpages.get(g, ()):
                t[slot].zero_()
        self._slot_ranks[slot] = {}
        if self._own is not None and slot in self._own_pages:
            self._own.free(self._own_pages.pop(slot))

    def write(
        self, slot: int, weights: LoraWeights, pages: dict[str, list[int]] | None = None
    ) -> None:
        """Copy ``weights`` into ``pages`` (from ``SlotTable.assign``) and point ``slot``'s
        rows of the page and rank tables at them. On CUDA on the side stream (module
        docstring); the host does not wait. ``pages=None`` (a pool used without an engine's
        ``SlotTable``, never mixed with one): the pool's own allocator places them."""
        self._check_slot(slot)
        if weights.max_rank > self.max_rank:
            raise ValueError(f"adapter rank {weights.max_rank} > pool max rank {self.max_rank}")
        need = page_need(weights)
        if pages is None:
            if self._own is None:
                self._own = PageAllocator(self.plan)
            if slot in self._own_pages:
                self._own.free(self._own_pages.pop(slot))
            pages = self._own_pages[slot] = self._own.alloc(need)
        for m, n in need.items():
            if len(pages.get(m, ())) != n:
                raise ValueError(f"{m}: {n} pages needed, {len(pages.get(m, ()))} given")
        cs = self.copy_stream
        if cs is None:
            self._write(slot, pages, {g: (p.a, p.b, p.ranks) for g, p in weights.groups.items()})
        else:
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(cs):
                # to the device now (overlaps the steps in flight), allocated on this stream
                staged = {
                    g: (
                        p.a.to(self.device, non_blocking=True),
                        p.b.to(self.device, non_blocking=True),
                        p.ranks.to(self.device, non_blocking=True),
                    )
                    for g, p in weights.groups.items()
                }
                cs.wait_stream(main)  # steps queued so far may read pages this reuses
                self._write(slot, pages, staged)
            main.wait_stream(cs)  # the next step reads what was written
        # PackedGroup.a is [L, P, r, in], r this adapter's largest rank in the group
        self._slot_ranks[slot] = {g: int(p.a.shape[2]) for g, p in weights.groups.items()}

    def _write(
        self,
        slot: int,
        pages: dict[str, list[int]],
        src: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],  # g -> a, b, ranks
    ) -> None:
        for g in self._groups:
            mods = ALL_GROUPS[g]
            P, in_f, offs, per = self._shape[g]
            row = torch.zeros(P, self.max_pages, dtype=torch.int32)
            if g not in src:
                self._ranks[g][:, slot].zero_()
                self._pages[g][slot].zero_()
                for t in self._vpages.get(g, ()):
                    t[slot].zero_()
                continue
            a, b, ranks = src[g]
            r = a.shape[2]
            for p, m in enumerate(mods):
                for j, off in enumerate(pages.get(m, ())):
                    pa, pb = self._page_views(m, off)
                    lo, hi = j * PAGE_ROWS, min(r, (j + 1) * PAGE_ROWS)
                    pa[:, : hi - lo].copy_(a[:, p, lo:hi])
                    pb[:, :, : hi - lo].copy_(b[:, offs[p] : offs[p + 1], lo:hi])
                    if hi - lo < PAGE_ROWS:
                        pa[:, hi - lo :].zero_()
                        pb[:, :, hi - lo :].zero_()
                    row[p, j] = off
            L = self.num_layers
            self._ranks[g][:, slot].copy_(ranks.view(L, per, P), non_blocking=True)
            self._pages[g][slot].copy_(_pinned(row, self.device), non_blocking=True)
            if per > 1:  # expert e's A rows sit e * PAGE_ROWS * in further, its B rows
                # e * out_p * PAGE_ROWS further (multiples of GRANULE: config.validate)
                e = torch.arange(per, dtype=torch.int32)[:, None, None]
                outs = torch.tensor([offs[q + 1] - offs[q] for q in range(P)], dtype=torch.int32)[
                    None, :, None
                ]
                va = row[None] + e * (PAGE_ROWS * in_f // GRANULE)
                vb = row[None] + e * outs * PAGE_ROWS // GRANULE
                for t, v in zip(self._vpages[g], (va, vb), strict=True):
                    t[slot].copy_(_pinned(v.contiguous(), self.device), non_blocking=True)


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory() if device.type == "cuda" else t
