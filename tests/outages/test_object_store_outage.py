"""S3 refused or black-holed: adapters on local disk keep serving; a cold adapter and an
upload get a 503 in the envelope with Retry-After within seconds (milliseconds once the
breaker is open); ``/ready`` says so; cold adapters load within seconds of S3 coming back,
and the ledger meters each request exactly once (the refused ones as errors)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from outage_live import FAST_S, OutageGateway, answer, assert_unavailable, upload

from tests.gateway.live import BASE


def test_object_store_down(
    og: OutageGateway, mode: str, tiny_llama_dir: Path, make_peft_adapter: Callable[..., Path]
) -> None:
    cold_dir = make_peft_adapter(tiny_llama_dir, rank=2, seed=100 + len(mode))  # never fetched
    t = og.tenant(adapters={"warm": og.warm_dir, "cold": cold_dir})
    og.chat(t, "warm")
    og.proxies.s3.set(mode)
    og.chat(t, "warm")  # on local disk (and in the engine)
    og.chat(t, BASE)
    for _ in range(2):
        og.chat_refused(t.key, "cold")  # the engine could not fetch it: metered as an error
        t.failed += 1
    with og.http() as admin:
        refused = answer(lambda: upload(admin, t.name, "new", make_peft_adapter(
            tiny_llama_dir, rank=2, seed=200 + len(mode))))  # fmt: skip
        assert_unavailable(refused)
        assert refused.json()["error"]["code"] == "object_store_unavailable"
        gc = answer(lambda: admin.post("/admin/v1/adapters/gc", json={"grace_s": 3600}))
        assert_unavailable(gc)
    ready = og.ready()
    assert ready["checks"]["object_store"].startswith("error")
    assert ready["breakers"]["object_store"] == "open"
    assert og.breaker_state("object_store") == 2
    for _ in range(3):  # the breaker is open: no timeouts any more
        og.chat_refused(t.key, "cold", within_s=FAST_S)
        t.failed += 1
        og.chat(t, "warm", within_s=FAST_S)

    og.proxies.s3.restore()

    def cold_loads() -> bool:
        if og.served(t, "cold"):
            return True
        t.failed += 1  # still refused by the engine: metered as an error
        return False

    og.wait_recovered(cold_loads)  # the engine side's breaker let its fetches through
    og.wait_recovered(lambda: og.ready()["breakers"]["object_store"] == "closed")  # the gateway's
    og.assert_ledger_exact(t)
