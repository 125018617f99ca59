"""Limits and metering over HTTP: two gateway instances (each with its engine) sharing one
Redis and one database; every admitted request is in the ledger once, with the usage the
API returned, and the usage API and export agree with it."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplex.engine.config import EngineConfig
from loraplex.engine_wiring import inproc_engine
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from loraplex.tenancy.usage import cost_micros
from tests.gateway.live import BASE, Gateway, fresh_database, live_server, ok, wait_until

HELLO = [{"role": "user", "content": "Hello there, robot."}]


@dataclass
class Pair:
    gateways: list[Gateway]
    admin_token: str
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    def admin(self) -> httpx.Client:
        return self.gateways[0].admin()

    def tenant(self, limits: dict[str, Any] | None = None, plan: str | None = None) -> str:
        """A new tenant with one key (inference + usage:read); returns the tenant name."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        with self.admin() as admin:
            ok(admin.post("/admin/v1/tenants", json={"name": name, "limits": limits or {}}))
            if plan is not None:
                ok(admin.patch(f"/admin/v1/tenants/{name}", json={"plan": plan}))
            issued = ok(
                admin.post(
                    f"/admin/v1/tenants/{name}/keys", json={"scopes": ["inference", "usage:read"]}
                )
            )
        self.keys[name] = issued["key"]
        return name

    def ledger(self, tenant: str) -> dict[str, tuple[int, int, int, str]]:
        rows = self.gateways[0].sql(
            "SELECT request_id, prompt_tokens, completion_tokens, cost_micros, u.status "
            "FROM usage_records u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s",
            tenant,
        )
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


@pytest.fixture(scope="module")
def pair(
    tiny_llama_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    token, secret = secrets.token_hex(16), secrets.token_hex(32)
    config = EngineConfig(device="cpu", max_num_seqs=16, num_gpu_blocks=256, max_loras=2)
    with fresh_database() as url:
        settings = [
            GatewaySettings(
                database_url=url,
                redis_url=redis_url,
                admin_token=token,
                secret_key=secret,
                data_dir=tmp_path_factory.mktemp(f"gw{i}"),
                served_model_name=BASE,
                model=str(tiny_llama_dir),
                key_cache_ttl_s=1.0,
                limits_redis_timeout_s=10.0,  # a loaded CI machine is not an outage
            )
            for i in range(2)
        ]
        apps = [
            create_app(s, engine_factory=lambda s=s: inproc_engine(s, str(tiny_llama_dir), config))
            for s in settings
        ]
        with live_server(apps[0]) as u0, live_server(apps[1]) as u1:
            gws = [
                Gateway(url=u, app=a, database_url=url, admin_token=token)
                for u, a in zip((u0, u1), apps, strict=True)
            ]
            with httpx.Client() as probe:
                for g in gws:
                    wait_until(lambda g=g: probe.get(f"{g.url}/ready").status_code == 200, 120)
            yield Pair(gws, token)


async def burst(pair: Pair, tenant: str, n: int, max_tokens: int = 1) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {pair.keys[tenant]}"}
    body = {"model": BASE, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0}
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(f"{pair.urls[i % 2]}/v1/chat/completions", json=body)
                    for i in range(n)
                )
            )
        )


def store_failures(pair: Pair) -> float:
    """Checks made while a gateway could not reach Redis (they would void the counts)."""
    total = 0.0
    for g in pair.gateways:
        registry = g.services.metrics.registry  # type: ignore[union-attr]
        for check in ("rate", "budget"):
            for outcome in ("admitted", "rejected"):
                labels = {"check": check, "outcome": outcome}
                total += (
                    registry.get_sample_value("loraplex_limiter_unavailable_total", labels) or 0
                )
    return total


def wait_ledger(pair: Pair, tenant: str, count: int) -> dict[str, tuple[int, int, int, str]]:
    wait_until(lambda: len(pair.ledger(tenant)) >= count, 60)
    rows = pair.ledger(tenant)
    assert len(rows) == count
    return rows


def returned_usage(responses: list[httpx.Response]) -> dict[str, tuple[int, int]]:
    out = {}
    for r in responses:
        body = r.json()
        out[body["id"]] = (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return out


def test_requests_per_minute_across_two_instances(pair: Pair) -> None:
    tenant = pair.tenant({"requests_per_minute": 50})
    responses = asyncio.run(burst(pair, tenant, 200))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 50 and codes.count(429) == 150, (codes, store_failures(pair))
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "50"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    admitted = [r for r in responses if r.status_code == 200]
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(50))
    assert all(r.headers["x-ratelimit-reset-requests"].endswith("s") for r in admitted)

    # Metering: each admitted request once in the ledger, with the usage the API returned.
    usage = returned_usage(admitted)
    ledger = wait_ledger(pair, tenant, 50)
    assert {rid: (p, c) for rid, (p, c, _, _) in ledger.items()} == usage
    assert all(status == "ok" for *_, status in ledger.values())

    # The tenant's own usage API and the operator's export agree with it.
    key = {"Authorization": f"Bearer {pair.keys[tenant]}"}
    own = httpx.get(
        f"{pair.urls[1]}/v1/usage",
        params={"granularity": "request", "from": "2000-01-01"},
        headers=key,
    )
    assert own.status_code == 200, own.text
    rows = [json.loads(line) for line in own.text.splitlines()]
    assert {r["request_id"]: (r["prompt_tokens"], r["completion_tokens"]) for r in rows} == usage
    with pair.admin() as admin:
        export = admin.get(
            "/admin/v1/usage/export",
            params={"tenant": tenant, "granularity": "day", "format": "csv", "from": "2000-01-01"},
        )
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    header, *lines = export.text.splitlines()
    cols = header.split(",")
    day_rows = [dict(zip(cols, line.split(","), strict=True)) for line in lines]
    assert sum(int(r["requests"]) for r in day_rows) == 50
    assert sum(int(r["prompt_tokens"]) for r in day_rows) == sum(p for p, _ in usage.values())


def test_tokens_per_minute_across_two_instances(pair: Pair) -> None:
    probe = pair.tenant()
    (first,) = asyncio.run(burst(pair, probe, 1))
    reserve = first.json()["usage"]["prompt_tokens"] + 1  # prompt + max_tokens
    tenant = pair.tenant({"tokens_per_minute": 20 * reserve})
    responses = asyncio.run(burst(pair, tenant, 80))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 20 and codes.count(429) == 60, (codes, store_failures(pair))
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["x-ratelimit-limit-tokens"] == str(20 * reserve)
    assert "tokens per minute" in refused.json()["error"]["message"]
    ledger = wait_ledger(pair, tenant, 20)
    admitted = [r for r in responses if r.status_code == 200]
    assert {rid: (p, c) for rid, (p, c, _, _) in ledger.items()} == returned_usage(admitted)


def test_aborted_stream_is_metered_once_and_frees_its_slot(pair: Pair) -> None:
    tenant = pair.tenant({"max_concurrent": 1})
    headers = {"Authorization": f"Bearer {pair.keys[tenant]}"}
    body = {
        "model": BASE,
        "messages": HELLO,
        "max_tokens": 200,
        "stream": True,
        "temperature": 0,
    }
    with httpx.Client(headers=headers, timeout=60) as client:
        with client.stream("POST", f"{pair.urls[0]}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first[6:])["id"]
            next(lines)
        # The client is gone; the gateway aborts, settles and meters what was generated.
        ledger = wait_ledger(pair, tenant, 1)
        _, completion, _, status = ledger[request_id]
        assert status == "aborted" and 0 < completion < 200
        again = client.post(
            f"{pair.urls[1]}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}
        )
        assert again.status_code == 200, again.text  # the concurrency slot was released
    assert len(wait_ledger(pair, tenant, 2)) == 2


def test_plan_prices_are_billed(pair: Pair) -> None:
    name = f"pro-{uuid.uuid4().hex[:6]}"
    with pair.admin() as admin:
        bad = admin.post("/admin/v1/plans", json={"name": name, "limits": {"rpm": 1}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limits.rpm"
        plan = ok(
            admin.post(
                "/admin/v1/plans",
                json={
                    "name": name,
                    "prompt_price_micros": 150_000_000,
                    "completion_price_micros": 600_000_000,
                },
            )
        )
        assert plan["name"] == name
        assert name in [p["name"] for p in ok(admin.get("/admin/v1/plans"))["data"]]
        assert ok(admin.get(f"/admin/v1/plans/{name}"))["prompt_price_micros"] == 150_000_000
    tenant = pair.tenant(plan=name)
    responses = asyncio.run(burst(pair, tenant, 4, max_tokens=3))
    assert [r.status_code for r in responses] == [200] * 4
    ledger = wait_ledger(pair, tenant, 4)
    for rid, (p, c) in returned_usage(responses).items():
        assert ledger[rid][2] == cost_micros(p, c, 150_000_000, 600_000_000) > 0


def test_metrics_endpoint(pair: Pair) -> None:
    tenant = pair.tenant({"requests_per_minute": 1})
    asyncio.run(burst(pair, tenant, 4))
    text = httpx.get(f"{pair.urls[0]}/metrics").text
    for name in (
        'loraplex_http_requests_total{method="POST",route="/v1/chat/completions",status="429"}',
        'loraplex_limit_rejections_total{limit="requests",scope="tenant"}',
        "loraplex_time_to_first_token_seconds_bucket",
        "loraplex_time_per_output_token_seconds_bucket",
        "loraplex_e2e_request_latency_seconds_bucket",
        'loraplex_tokens_total{kind="prompt"}',
        "loraplex_ledger_lag_seconds",
        "loraplex_engine_requests_waiting",
        "loraplex_engine_kv_blocks_used",
        "loraplex_engine_batch_size",
        "loraplex_engine_adapters_resident",
    ):
        assert name in text, name
    assert "tenant=" not in text  # bounded labels unless switched on


def test_usage_routes_scope_and_validation(pair: Pair) -> None:
    mine, other = pair.tenant(), pair.tenant()
    asyncio.run(burst(pair, mine, 2))
    asyncio.run(burst(pair, other, 3))
    wait_ledger(pair, mine, 2)
    wait_ledger(pair, other, 3)
    url = f"{pair.urls[0]}/v1/usage"
    auth = {"Authorization": f"Bearer {pair.keys[mine]}"}
    rows = httpx.get(url, params={"from": "2000-01-01", "granularity": "request"}, headers=auth)
    assert {json.loads(line)["tenant"] for line in rows.text.splitlines()} == {mine}
    day = httpx.get(url, params={"format": "parquet"}, headers=auth)  # month to date, by day
    assert (
        day.status_code == 200 and day.headers["content-type"] == "application/vnd.apache.parquet"
    )
    for params, param in (
        ({"granularity": "week"}, "granularity"),
        ({"format": "xml"}, "format"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-02-01", "to": "2026-01-01"}, "to"),
    ):
        bad = httpx.get(url, params=params, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    with pair.admin() as admin:
        issued = ok(admin.post(f"/admin/v1/tenants/{mine}/keys", json={"scopes": ["inference"]}))
        missing = admin.get("/admin/v1/usage/export", params={"tenant": "no-such-tenant"})
        assert missing.status_code == 404
        everyone = admin.get(
            "/admin/v1/usage/export", params={"format": "jsonl", "from": "2000-01-01"}
        )
        tenants = {json.loads(line)["tenant"] for line in everyone.text.splitlines()}
        assert {mine, other} <= tenants
    no_scope = httpx.get(url, headers={"Authorization": f"Bearer {issued['key']}"})
    assert no_scope.status_code == 403
    assert httpx.get(f"{pair.urls[0]}/admin/v1/usage/export", headers=auth).status_code == 401


def test_plan_limits_apply_under_the_tenants_own(pair: Pair) -> None:
    name = f"starter-{uuid.uuid4().hex[:6]}"
    with pair.admin() as admin:
        ok(admin.post("/admin/v1/plans", json={"name": name, "limits": {"requests_per_minute": 3}}))
    on_plan = pair.tenant(plan=name)
    overridden = pair.tenant({"requests_per_minute": 5}, plan=name)
    codes = [r.status_code for r in asyncio.run(burst(pair, on_plan, 6))]
    assert codes.count(200) == 3 and codes.count(429) == 3
    codes = [r.status_code for r in asyncio.run(burst(pair, overridden, 8))]
    assert codes.count(200) == 5 and codes.count(429) == 3
    with pair.admin() as admin:  # a plan change applies (cached keys: within the cache TTL)
        ok(admin.patch(f"/admin/v1/plans/{name}", json={"limits": {"requests_per_minute": 1}}))
    later = pair.tenant(plan=name)
    codes = [r.status_code for r in asyncio.run(burst(pair, later, 3))]
    assert codes.count(200) == 1 and codes.count(429) == 2


def test_tenants_are_scheduled_by_their_own_fairness_key(pair: Pair) -> None:
    """The gateway sends the tenant as the engine's fairness key with the weight and tier of
    its plan and limits; the engine reports service per key (docs/fairness.md)."""
    heavy = pair.tenant({"scheduling_weight": 4, "priority_tier": 0})
    light = pair.tenant()
    asyncio.run(burst(pair, heavy, 3, max_tokens=3))
    asyncio.run(burst(pair, light, 2, max_tokens=3))
    with pair.admin() as admin:
        ids = {t: ok(admin.get(f"/admin/v1/tenants/{t}"))["id"] for t in (heavy, light)}
        for bad in ({"scheduling_weight": 0}, {"priority_tier": 3}, {"scheduling_weight": 1.5}):
            r = admin.patch(f"/admin/v1/tenants/{light}", json={"limits": bad})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"].startswith("limits.")
    for g in pair.gateways:  # both engines served both tenants (bursts alternate gateways)
        registry = g.services.metrics.registry  # type: ignore[union-attr]
        for tenant in (heavy, light):
            labels = {"fairness_key": ids[tenant], "kind": "decode"}
            got = registry.get_sample_value("loraplex_engine_fair_service_tokens_total", labels)
            assert got and got > 0, (tenant, labels)
