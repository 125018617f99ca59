"""GPU adapter memory in pages of rank rows: the allocator, residency with pins, the pool's
contents against the PEFT files, and bytes per adapter against its own bytes."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.engine.lora.pool import (
    GRANULE,
    PAGE_ROWS,
    LoraPool,
    page_bytes,
    page_need,
    plan_pages,
)
from loraplex.engine.lora.slots import PageAllocator, PagePlan, SlotTable
from loraplex.engine.lora.weights import GROUPS, MODULE_GROUP, module_dims, read_adapter
from loraplex.engine.model.presets import PRESETS

CFG = PRESETS["tiny"]  # hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads of 16
PREFIX = "base_model.model.model.layers"
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {m: "self_attn" if m in ALL[:4] else "mlp" for m in ALL}


def write_adapter(path: Path, r: int, targets=ALL, alpha: float = 16, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    dims = module_dims(CFG)
    t = {}
    for layer in range(CFG.num_layers):
        for m in targets:
            in_f, out_f = dims[m]
            key = f"{PREFIX}.{layer}.{PARENT[m]}.{m}.lora_"
            t[key + "A.weight"] = torch.randn(r, in_f, generator=g)
            t[key + "B.weight"] = torch.randn(out_f, r, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets)}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(t, str(path / "adapter_model.safetensors"))
    return path


def read(path: Path, max_rank: int = 64):
    return read_adapter(path, CFG, max_rank=max_rank, dtype=torch.float32)


def plan(num_slots=8, num_chunks=4, chunk=12, pages=None) -> PagePlan:
    return PagePlan(num_slots, num_chunks, chunk, pages or {"x": 3, "y": 4})


# ---- the allocator and the slot table (ints) ---------------------------------------------


def test_allocator_shares_chunks_between_groups():
    a = PageAllocator(plan())  # chunks of 12 granules: 4 pages of x, or 3 of y
    got = a.alloc({"x": 5})  # two chunks for x
    assert len(got["x"]) == 5 and len(set(got["x"])) == 5 and a.free_chunks == 2
    assert all(off % 3 == 0 and off // 12 < 2 for off in got["x"])
    assert a.chunks_short({"y": 7}) == 1 and a.chunks_short({"y": 6, "x": 3}) == 0
    y = a.alloc({"y": 6})
    assert a.free_chunks == 0 and a.chunks_short({"y": 1}) == 1
    a.free(got)  # x's chunks empty: back to the shared list
    assert a.free_chunks == 2 and a.pages_used() == 6
    a.free(y)
    assert a.free_chunks == 4 and a.pages_used() == 0
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free(y)


def test_slot_table_evicts_lru_never_pinned():
    t = SlotTable(plan(num_slots=8, num_chunks=2, chunk=12))  # 8 pages of x in all
    s1, ev = t.assign("a", {"x": 4})
    t.pin(s1)
    t.assign("b", {"x": 2})
    s3, _ = t.assign("c", {"x": 2})
    assert not t.fits({"x": 1}) and t.can_assign({"x": 4})
    assert not t.can_assign({"x": 5})  # a's 4 pages are pinned
    t.pin(s3)
    s4, ev = t.assign("d", {"x": 2})  # b is the only unpinned one
    assert ev == ["b"] and t.lookup("b") is None and t.lookup("a") == s1
    t.pin(s4)
    assert not t.can_assign({"x": 1})
    t.unpin(s3)
    assert t.can_assign({"x": 2}) and not t.can_assign({"x": 3})
    with pytest.raises(RuntimeError, match="pinned"):
        t.release("a")
    assert t.evictions == 1


def test_can_assign_counts_chunks_that_pinned_pages_hold():
    # y needs whole chunks: a pinned x page in every chunk leaves no room for y even though
    # most pages are free
    t = SlotTable(plan(num_slots=8, num_chunks=2, chunk=12))
    keep = []
    for i in range(8):
        s, _ = t.assign(f"k{i}", {"x": 1})
        keep.append(s)
    t.pin(keep[0])  # chunk 0
    t.pin(keep[4])  # chunk 1
    assert not t.can_assign({"y": 1})
    assert t.can_assign({"x": 6}) and not t.can_assign({"x": 7})
    t.unpin(keep[4])
    assert t.can_assign({"y": 3}) and not t.can_assign({"y": 4})
    s, ev = t.assign("y", {"y": 3})
    assert t.lookup("k0") == keep[0] and len(ev) >= 4


def test_storm_never_deadlocks_and_returns_every_page():
    # random sequences of pins over many adapters through few pages: assign succeeds
    # whenever can_assign says so, pinned adapters are never evicted, pages never double
    rng = random.Random(0)
    p = plan(num_slots=16, num_chunks=6, chunk=12)
    t = SlotTable(p)
    pins: dict[str, int] = {}
    for _ in range(3000):
        key = f"a{rng.randrange(200)}"
        need = {"x": rng.randint(1, 4)} if rng.random() < 0.5 else {"y": rng.randint(1, 3)}
        if pins and rng.random() < 0.45:  # a request finishes
            k = rng.choice(sorted(pins))
            t.unpin(t.lookup(k))
            pins[k] -= 1
            if not pins[k]:
                del pins[k]
            continue
        slot = t.lookup(key)
        if slot is None:
            # can_assign against the brute force: evict every unpinned adapter, then fits?
            oracle = copy.deepcopy(t)
            for k in oracle.resident:
                if not oracle.is_pinned(oracle.lookup(k)):
                    oracle.release(k)
            assert t.can_assign(need) == oracle.fits(need)
            if not t.can_assign(need):
                assert pins, "nothing pinned, yet no room"
                continue
            slot, evicted = t.assign(key, need)
            assert not set(evicted) & set(pins)
        t.pin(slot)
        pins[key] = pins.get(key, 0) + 1
        owned = [off for s in range(p.num_slots) for o in t.pages_of(s).values() for off in o]
        assert len(owned) == len(set(owned)) == t.pages.pages_used()
    for k, n in pins.items():
        for _ in range(n):
            t.unpin(t.lookup(k))
    for k in t.resident:
        t.release(k)
    assert t.pages.pages_used() == 0 and t.pages.free_chunks == p.num_chunks


# ---- the pool ----------------------------------------------------------------------------


def pool(budget_mib: float = 4, max_rank: int = 64, **kw) -> LoraPool:
    return LoraPool(
        CFG, budget_bytes=int(budget_mib * 2**20), max_rank=max_rank, dtype=torch.float32,
        device=torch.device("cpu"), **kw,
    )  # fmt: skip


def gpu_modules(p: LoraPool, slot: int, pages: dict[str, list[int]]) -> dict:
    """(layer, module) -> (A [r, in], B [out, r]) read back from the slot's pages, found
    through the pool's page table (checked against ``pages``)."""
    out = {}
    for g, mods in GROUPS.items():
        for i, m in enumerate(mods):
            n = len(pages.get(m, ()))
            assert p.layers[0][g].pages[slot, i, :n].tolist() == pages.get(m, [])
            if not n:
                continue
            views = [p.read_page(m, off) for off in pages[m]]
            a = torch.cat([v[0] for v in views], dim=1)  # [L, rows, in]
            b = torch.cat([v[1] for v in views], dim=2)  # [L, out, rows]
            for layer in range(CFG.num_layers):
                r = int(p.layers[layer][g].ranks[slot, i])
                if r:
                    out[(layer, m)] = (a[layer, :r], b[layer, :, :r])
    return out


@pytest.mark.parametrize("r", [3, 8, 12, 16, 32, 64])
def test_pages_hold_peft_weights_scale_folded(tmp_path, r):
    from safetensors.torch import load_file

    path = write_adapter(tmp_path / f"r{r}", r, alpha=2 * r + 1, seed=r)
    files = load_file(str(path / "adapter_model.safetensors"))
    p = pool()
    t = SlotTable(p.plan)
    w = read(path)
    # another adapter first, so that pages are not simply the first ones
    other = read(write_adapter(tmp_path / "o", 8, seed=99))
    so, _ = t.assign("o", page_need(other))
    p.write(so, other, t.pages_of(so))
    slot, _ = t.assign("a", page_need(w))
    assert page_need(w) == dict.fromkeys(MODULE_GROUP, -(-r // PAGE_ROWS))
    p.write(slot, w, t.pages_of(slot))
    got = gpu_modules(p, slot, t.pages_of(slot))
    assert len(got) == CFG.num_layers * len(ALL)
    scale = (2 * r + 1) / r
    for (layer, m), (a, b) in got.items():
        key = f"{PREFIX}.{layer}.{PARENT[m]}.{m}.lora_"
        torch.testing.assert_close(a, files[key + "A.weight"])
        torch.testing.assert_close(b, files[key + "B.weight"] * scale)
    # the other adapter was not touched by this write
    for (layer, m), (a, _) in gpu_modules(p, so, t.pages_of(so)).items():
        torch.testing.assert_close(a, other.modules[(layer, m)].a)


@pytest.mark.parametrize("r", [8, 16, 32, 64])
def test_bytes_per_adapter_follow_its_rank(tmp_path, r):
    # GPU bytes an adapter holds within 10 % of its own bytes (q,v as PEFT's default; q,k,v,o
    # as in S-LoRA; all seven)
    for targets in (("q_proj", "v_proj"), ALL[:4], ALL):
        w = read(write_adapter(tmp_path / f"{r}{len(targets)}", r, targets))
        elem = 4
        pb = page_bytes(CFG, elem)
        held = sum(
            n * -(-pb[g] // (GRANULE * elem)) * GRANULE * elem for g, n in page_need(w).items()
        )
        # its own bytes: its modules' A and B (the host packing may pad a group's absent
        # projections; the pages never do)
        own = sum((m.a.numel() + m.b.numel()) * m.a.element_size() for m in w.modules.values())
        assert own <= held <= 1.1 * own, (r, targets, held, own)
        # the slot table knows the same bytes of its slot (what a step reads of it)
        t = SlotTable(plan_pages(CFG, 4 * held, elem))
        slot, _ = t.assign("a", page_need(w))
        assert t.nbytes([slot]) == held and t.nbytes([]) == 0
        t.release("a")
        assert t.nbytes([slot]) == 0


def test_rank8_adapters_in_the_budget_of_padded_slots():
    # the budget of 8 slots padded to rank 64 holds >= 4x as many rank-8 adapters (8x here)
    elem = 4
    padded_slot = sum(page_bytes(CFG, elem).values()) * (64 // PAGE_ROWS)
    p = plan_pages(CFG, 8 * padded_slot, elem)
    t = SlotTable(p)
    need = dict.fromkeys(MODULE_GROUP, 1)
    n = 0
    while t.fits(need):
        t.assign(f"a{n}", need)
        n += 1
    assert n >= 4 * 8, n


def test_write_clear_and_load_unload_return_every_page(tmp_path):
    p = pool(budget_mib=2)
    t = SlotTable(p.plan)
    ws = [
        read(write_adapter(tmp_path / f"w{r}", r, ALL[: 1 + r % 7], seed=r))
        for r in (8, 16, 24, 64)
    ]
    arena_before = p.arena.data_ptr(), p.nbytes()
    for i in range(1000):
        w = ws[i % len(ws)]
        key = f"k{i}"
        slot, _ = t.assign(key, page_need(w))
        p.write(slot, w, t.pages_of(slot))
        # the host's view of the slot: each group it touches at its rank (the segment
        # kernels' width), the empty slot -1 adding nothing
        assert p.ranks_used({slot, -1}) == dict.fromkeys(w.groups, w.max_rank)
        if i % 3 == 0:  # some stay until evicted, the rest are unloaded
            continue
        t.release(key)
        p.clear(slot)
        assert p.ranks_used({slot}) == {}
    assert t.evictions > 0  # the budget is small: the kept ones were evicted for others
    released = [t.release(k) for k in t.resident]
    for s in released:
        p.clear(s)
    assert t.pages.pages_used() == 0 and t.pages.free_chunks == p.plan.num_chunks
    assert (p.arena.data_ptr(), p.nbytes()) == arena_before  # nothing allocated beside
    for g in GROUPS:
        for s in released:
            assert not p.layers[0][g].ranks[s].any() and not p.layers[0][g].pages[s].any()


def test_budget_too_small_is_refused():
    with pytest.raises(ValueError, match="smaller than one page"):
        pool(budget_mib=0.01)


@pytest.mark.gpu
def test_side_stream_writes_land_before_the_next_step_reads(tmp_path):
    # on CUDA a write goes on the pool's copy stream, after the work queued on the main stream
    # (which may read the pages it reuses), and the main stream waits for it: a page read
    # right after a write queued behind a long main-stream op holds the new adapter, and the
    # op queued before it saw the old one
    dev = torch.device("cuda")
    p = LoraPool(CFG, budget_bytes=2 * 2**20, max_rank=64, dtype=torch.float32, device=dev)
    t = SlotTable(p.plan)
    old = read(write_adapter(tmp_path / "old", 8, seed=1))
    new = read(write_adapter(tmp_path / "new", 8, seed=2))
    slot, _ = t.assign("old", page_need(old))
    p.write(slot, old, t.pages_of(slot))
    off = t.pages_of(slot)["q_proj"][0]
    big = torch.randn(4096, 4096, device=dev)
    for _ in range(20):  # a long main-stream op ahead of the reuse
        big = big @ big.T / 4096
    seen = p.read_page("q_proj", off)[0]  # queued before the write: reads the old weights
    t.release("old")
    slot2, _ = t.assign("new", page_need(new))
    assert t.pages_of(slot2)["q_proj"][0] == off  # the page is reused
    p.write(slot2, new, t.pages_of(slot2))
    after = p.read_page("q_proj", off)[0]
    torch.cuda.synchronize()
    torch.testing.assert_close(seen[0, :8].cpu(), old.modules[(0, "q_proj")].a)
    torch.testing.assert_close(after[0, :8].cpu(), new.modules[(0, "q_proj")].a)
