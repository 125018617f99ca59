"""The host-memory tier of adapter weights (engine.lora.loader)."""

from __future__ import annotations

import time
from pathlib import Path

from engine.api import AdapterRef
from engine.lora.loader import AdapterLoader


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
