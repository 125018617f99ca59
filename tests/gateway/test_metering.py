"""Usage records per request (also for a client that disconnects mid-stream, whose engine
request is aborted and its KV freed), and rate limits surfacing as the SDK's errors."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.live import BASE, Gateway, ok, wait_until

MSG = [{"role": "user", "content": "Tell me a story about a robot."}]


def _usage_row(gateway: Gateway, request_id: str) -> dict[str, Any]:
    cols = "status, prompt_tokens, completion_tokens, model, adapter_version_id, api_key_id"
    rows: list[tuple[Any, ...]] = []

    def landed() -> bool:
        rows[:] = gateway.sql(f"SELECT {cols} FROM usage_records WHERE request_id = %s", request_id)
        return bool(rows)

    wait_until(landed, 20)
    (row,) = rows
    return dict(zip([c.strip() for c in cols.split(",")], row, strict=True))


def test_every_request_leaves_one_usage_record(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.chat.completions.create(model="support", messages=MSG, max_tokens=3, temperature=0)
    row = _usage_row(gateway, r.id)
    assert row["status"] == "ok" and row["model"] == "support"
    assert row["prompt_tokens"] == r.usage.prompt_tokens
    assert row["completion_tokens"] == r.usage.completion_tokens == 3
    assert row["adapter_version_id"] is not None and row["api_key_id"] is not None

    chunks = list(
        client.completions.create(model=BASE, prompt="The quick", max_tokens=2, stream=True)
    )
    row = _usage_row(gateway, chunks[0].id)
    assert row["status"] == "ok" and row["completion_tokens"] == 2
    assert row["adapter_version_id"] is None


def test_client_disconnect_aborts_the_engine_request_and_records_usage(
    gateway: Gateway,
) -> None:
    engine = gateway.engine
    request = {"model": BASE, "messages": MSG, "max_tokens": 400, "stream": True}
    started = time.monotonic()
    with gateway.http("a") as http, http.stream("POST", "/v1/chat/completions", json=request) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if len(events) >= 3:
                break
    # The connection is closed here, long before 400 tokens could have been generated.
    wait_until(
        lambda: (s := engine.stats()) is not None and s.num_running == s.num_waiting == 0, 10
    )
    wait_until(lambda: (s := engine.stats()) is not None and s.kv_blocks_used == 0, 10)
    row = _usage_row(gateway, events[0]["id"])
    assert row["status"] == "aborted"
    assert 2 <= row["completion_tokens"] < 400
    assert row["prompt_tokens"] > 0
    assert time.monotonic() - started < 30


def test_rate_limit_is_a_rate_limit_error(gateway: Gateway) -> None:
    tenant = f"rl-{gateway.tenants['a']}"
    with gateway.admin() as admin:
        ok(
            admin.post(
                "/admin/v1/tenants", json={"name": tenant, "limits": {"requests_per_minute": 2}}
            )
        )
        key = ok(admin.post(f"/admin/v1/tenants/{tenant}/keys", json={}))["key"]
    client = openai.OpenAI(api_key=key, base_url=f"{gateway.url}/v1", max_retries=0)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=BASE, messages=MSG, max_tokens=1
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=BASE, messages=MSG, max_tokens=1)
    assert exc.value.code == "rate_limit_exceeded"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        list(client.chat.completions.create(model=BASE, messages=MSG, max_tokens=1, stream=True))


def test_stream_of_n_choices(gateway: Gateway) -> None:
    with gateway.http("a") as http:
        body = {"model": BASE, "messages": MSG, "max_tokens": 3, "n": 2, "stream": True}
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    finished = {
        c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]
    }
    assert finished == {0: "length", 1: "length"}


def test_stream_errors_before_the_first_token_are_http_errors(gateway: Gateway) -> None:
    with gateway.http("a") as http:
        body = {"model": "nope", "messages": MSG, "stream": True}
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert isinstance(r, httpx.Response)


def test_usage_is_per_adapter_with_the_names_used(gateway: Gateway) -> None:
    """`support`, `support@1` and the alias `prod` are one adapter: one hour/day row each
    period, the names used beside it; request rows name the adapter and its version."""
    client = gateway.sdk("a")
    ids = {}
    for name in ("support", "support@1", "prod"):
        r = client.completions.create(model=name, prompt="Hi", max_tokens=1, temperature=0)
        ids[name] = r.id
        _usage_row(gateway, r.id)  # landed
    tenant = gateway.tenants["a"]
    with gateway.admin() as admin:

        def export(granularity: str) -> list[dict[str, Any]]:
            r = admin.get(
                "/admin/v1/usage/export",
                params={"tenant": tenant, "granularity": granularity, "format": "jsonl"},
            )
            assert r.status_code == 200, r.text
            return [json.loads(line) for line in r.text.splitlines() if line]

        days = export("day")
        requests = {row["request_id"]: row for row in export("request")}
    assert not [row for row in days if row["adapter"] in ("prod", "support@1")], days
    support = [row for row in days if row["adapter"] == "support"]
    assert support and all(row["tenant"] == tenant for row in support)
    used = {n for row in support for n in row["model"].split(", ")}
    assert {"support", "support@1", "prod"} <= used, support
    assert {(requests[ids[n]]["adapter"], requests[ids[n]]["adapter_version"]) for n in ids} == {
        ("support", 2),
        ("support", 1),
    }
    assert requests[ids["prod"]]["model"] == "prod"
