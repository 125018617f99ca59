"""The routing policy alone (``gateway.routing``), from plain values."""

from __future__ import annotations

from loraplex.gateway.routing import ReplicaView, choose, hash_order, load_bound


def test_hash_home_is_stable_and_moves_only_a_removed_replicas_keys() -> None:
    names = ["a", "b", "c"]
    homes = {f"k{i}": hash_order(f"k{i}", names)[0] for i in range(300)}
    assert {homes[k] for k in homes} == set(names)  # spread over all
    assert all(80 <= list(homes.values()).count(n) <= 120 for n in names)
    after = {k: hash_order(k, ["a", "b"])[0] for k in homes}
    assert all(after[k] == homes[k] for k in homes if homes[k] != "c")


def test_holder_first_then_home_then_spill_under_the_bound() -> None:
    home, other = hash_order("k", ["a", "b"])
    idle = [ReplicaView("a"), ReplicaView("b")]
    got = choose("k", idle, 1.25)
    assert got is not None and (got.name, got.outcome) == (home, "home")
    held = [ReplicaView(home), ReplicaView(other, gpu=frozenset({"k"}))]
    got = choose("k", held, 1.25)
    assert got is not None and (got.name, got.outcome) == (other, "resident")
    # the holder at the bound: ceil(1.25 * (5 + 0 + 1) / 2) = 4 <= 5 in flight -> spill home
    busy = [ReplicaView(home), ReplicaView(other, inflight=5, gpu=frozenset({"k"}))]
    assert load_bound(busy, 1.25) == 4
    got = choose("k", busy, 1.25)
    assert got is not None and (got.name, got.outcome) == (home, "home")
    over = [ReplicaView(home, inflight=5), ReplicaView(other)]
    got = choose("k", over, 1.25)
    assert got is not None and (got.name, got.outcome) == (other, "spill")
    base = choose(None, [ReplicaView("a", inflight=2), ReplicaView("b", inflight=1)], 1.25)
    assert base is not None and (base.name, base.outcome) == ("b", "base")
    assert choose("k", [], 1.25) is None


def test_floor_keeps_a_lightly_loaded_holder() -> None:
    home, other = hash_order("k", ["a", "b"])
    views = [ReplicaView(home), ReplicaView(other, inflight=3, gpu=frozenset({"k"}))]
    assert load_bound(views, 1.25) == 3  # the formula alone: spill at 3 in flight
    got = choose("k", views, 1.25, floor=8)
    assert got is not None and (got.name, got.outcome) == (other, "resident")


def test_replica_stats_merge_every_field() -> None:
    """The gateway's /metrics over several engines sums their stats, dict fields too (load
    tiers, fairness keys): a field the merge cannot sum would take every engine metric
    off the scrape."""
    from loraplex.engine.stats import AdapterTierLoads, EngineStats, FairKeyStats
    from loraplex.gateway.routing_metrics import merge_stats

    a = EngineStats(
        adapter_hits=2, gpu_adapters=["x"],
        adapter_loads_by_tier={"disk": AdapterTierLoads(count=1, buckets=[(0.1, 1)])},
        fairness={"t1": FairKeyStats(prefill_tokens=5, scheduled=1)},
    )  # fmt: skip
    b = EngineStats(
        adapter_hits=3, gpu_adapters=["y", "x"],
        adapter_loads_by_tier={"disk": AdapterTierLoads(count=2, buckets=[(0.1, 2)])},
        fairness={"t1": FairKeyStats(prefill_tokens=7, decode_tokens=1), "t2": FairKeyStats()},
    )  # fmt: skip
    m = merge_stats([a, b])
    assert m is not None and m.adapter_hits == 5 and m.gpu_adapters == ["x", "y"]
    assert m.adapter_loads_by_tier["disk"].count == 3
    assert m.fairness["t1"] == FairKeyStats(prefill_tokens=12, decode_tokens=1, scheduled=1)
    assert set(m.fairness) == {"t1", "t2"}
