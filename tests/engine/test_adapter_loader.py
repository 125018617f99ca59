"""The host-memory tier of adapter weights (engine.lora.loader)."""

from __future__ import annotations

import time
from pathlib import Path

from loraplex.engine.api import AdapterRef
from loraplex.engine.lora.loader import AdapterLoader


def test_host_cache_keeps_adapters_that_requests_still_need(tmp_path):
    """The host-memory tier is an LRU, but weights a request in flight still needs are
    never the ones evicted: with 4 adapters in flight over a bound of 1, each loads once."""
    reads: list[Path] = []
    in_use = {"a", "b", "c", "d"}
    loader = AdapterLoader(
        lambda p: reads.append(p) or str(p),
        max_host_adapters=1,
        workers=1,
        in_use=in_use.__contains__,
    )
    try:
        for key in sorted(in_use):
            loader.start(AdapterRef(key, str(tmp_path / key)))
        deadline = time.monotonic() + 10
        while loader.num_loading and time.monotonic() < deadline:
            loader.collect()
            time.sleep(0.01)
        assert all(loader.is_ready(k) for k in in_use)  # over the bound while all are needed
        in_use.discard("a")
        in_use.discard("b")
        loader.collect()
        assert [k for k in "abcd" if loader.is_ready(k)] == ["c", "d"]  # released ones go
        for key in ("c", "d"):
            assert not loader.start(AdapterRef(key, str(tmp_path)))  # no second load
        assert len(reads) == 4
    finally:
        loader.shutdown()


class _Weights:
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def nbytes(self) -> int:
        return self.size


def _drain(loader: AdapterLoader) -> None:
    deadline = time.monotonic() + 10
    while loader.num_loading and time.monotonic() < deadline:
        loader.collect()
        time.sleep(0.01)
    loader.collect()


def test_host_tier_is_bounded_in_bytes_and_loads_are_counted_by_tier(tmp_path):
    """250 bytes hold two 100-byte adapters: the least recently used one not in use goes;
    each load is counted under the tier its fetch reports (a plain path: disk)."""
    in_use: set[str] = set()
    sizes = {"a": 100, "b": 100, "c": 100, "d": 60}

    def fetch(ref: AdapterRef):
        path = tmp_path / ref.key
        return (path, "object_store") if ref.key == "c" else path

    loader = AdapterLoader(
        lambda p: _Weights(p.name, sizes[p.name]),
        fetch,
        max_host_bytes=250,
        workers=2,
        in_use=in_use.__contains__,
    )
    try:
        for key in ("a", "b"):
            loader.start(AdapterRef(key, str(tmp_path / key)))
        _drain(loader)
        assert loader.host_bytes == 200 and loader.num_host == 2
        loader.get("a")  # "b" is now the least recently used
        in_use.add("b")  # ...but a request needs it: "a" goes instead
        loader.start(AdapterRef("c", "store:c"))
        _drain(loader)
        assert [k for k in "abc" if loader.is_ready(k)] == ["b", "c"]
        assert loader.host_bytes == 200 and loader.stats.host_evictions == 1
        in_use.clear()
        loader.start(AdapterRef("d", str(tmp_path / "d")))
        _drain(loader)
        assert [k for k in "abcd" if loader.is_ready(k)] == ["c", "d"]
        assert loader.host_bytes == 160
        disk, store = loader.stats.by_tier["disk"], loader.stats.by_tier["object_store"]
        assert (disk.count, disk.bytes, store.count, store.bytes) == (3, 260, 1, 100)
        assert sum(disk.buckets) <= 3 and disk.seconds >= disk.read_seconds >= 0
        assert loader.drop("c") and loader.host_bytes == 60 and not loader.drop("c")
    finally:
        loader.shutdown()


def test_queued_loads_are_taken_round_robin_over_owners(tmp_path):
    """One owner's hundred cold adapters do not queue another owner's load behind them."""
    import threading

    gate = threading.Event()
    order: list[str] = []

    def read(p: Path) -> str:
        gate.wait(10)
        order.append(p.name)
        return str(p)

    loader = AdapterLoader(read, workers=1)
    try:
        for i in range(20):
            loader.start(AdapterRef(f"storm{i}", str(tmp_path / f"storm{i}")), owner="storm")
        loader.start(AdapterRef("calm", str(tmp_path / "calm")), owner="calm")
        gate.set()
        deadline = time.monotonic() + 10
        while loader.num_loading and time.monotonic() < deadline:
            loader.collect()
            time.sleep(0.01)
        assert len(order) == 21
        # the worker was on storm0 when calm came; calm is next or the one after
        assert order.index("calm") <= 2, order
    finally:
        loader.shutdown()
