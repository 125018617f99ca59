"""PostgreSQL refused or black-holed under a serving gateway: what caches can serve is
served (base model and adapters resolved before, with keys seen before), everything else
is a 503 in the OpenAI envelope with Retry-After within seconds, in milliseconds once the
breaker is open; the gateway recovers within seconds and the ledger is exact."""

from __future__ import annotations

import httpx
from outage_live import ANSWER_WITHIN_S, FAST_S, OutageGateway, Tenant, answer, assert_unavailable

from tests.gateway.live import BASE


def needs_the_database(
    og: OutageGateway, t: Tenant, api: httpx.Client, admin: httpx.Client, within_s: float
) -> None:
    for client, path in (
        (api, "/v1/models"),
        (api, "/v1/models/not-resolved-before"),
        (api, "/v1/usage?format=csv"),
        (admin, "/admin/v1/usage/export?format=jsonl"),
        (admin, "/admin/v1/tenants"),
        (admin, f"/admin/v1/tenants/{t.name}/adapters"),
    ):
        assert_unavailable(answer(lambda: client.get(path), within_s))  # noqa: B023
    og.chat_refused(t.unused_key, within_s=within_s)  # a key never seen: 503, not 401
    og.chat_refused(t.key, "warm@1", within_s=within_s)  # never resolved in this form


def test_database_down(og: OutageGateway, mode: str) -> None:
    t = og.tenant(adapters={"warm": og.warm_dir})
    og.chat(t, BASE)
    og.chat(t, "warm")  # the key and the adapter's resolution are now known
    with og.http(t.key) as api, og.http() as admin:
        og.proxies.db.set(mode)
        for model in (BASE, "warm", BASE, "warm"):  # served from what is known
            og.chat(t, model)
        needs_the_database(og, t, api, admin, ANSWER_WITHIN_S)
        ready = og.ready()
        assert ready["checks"]["database"].startswith("error")
        assert ready["breakers"]["database"] == "open"
        assert og.breaker_state("database") == 2
        for _ in range(3):  # the breaker is open: no timeouts any more
            needs_the_database(og, t, api, admin, FAST_S)
            og.chat(t, BASE, within_s=FAST_S)
            og.chat(t, "warm", within_s=FAST_S)

        og.proxies.db.restore()
        # recovered once a request that needs the database answers (/v1/models can answer
        # from what is known while the breaker still waits to probe)
        og.wait_recovered(lambda: admin.get("/admin/v1/tenants").status_code == 200)
        assert api.get("/v1/models").status_code == 200
        assert og.ready()["breakers"]["database"] == "closed"
    og.chat(t, "warm@1")
    og.assert_ledger_exact(t)
