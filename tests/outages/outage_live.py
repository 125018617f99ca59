"""A live gateway whose PostgreSQL, Redis and S3 (moto) each sit behind a TCP proxy the
tests control, and the checks every outage test makes of what clients get back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
from harness.tcp_proxy import ThreadedProxy

from tests.gateway.live import BASE, Gateway, ok, wait_until

T = TypeVar("T")

ANSWER_WITHIN_S = 10.0  # every client answer, whatever the outage
FAST_S = 2.0  # an answer while the dependency's breaker is open (no I/O: milliseconds)
RECOVER_WITHIN_S = 6.0  # breaker_open_s (2 s) + a probe, on a busy 2-core machine


@dataclass
class Proxies:
    db: ThreadedProxy
    redis: ThreadedProxy
    s3: ThreadedProxy

    def all(self) -> tuple[ThreadedProxy, ...]:
        return (self.db, self.redis, self.s3)


@dataclass
class Tenant:
    name: str
    key: str
    unused_key: str  # issued, never used: unknown to the key cache
    returned: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> usage
    failed: int = 0  # requests that reached the engine and failed (metered as errors)


@dataclass
class OutageGateway:
    gw: Gateway
    proxies: Proxies
    warm_dir: Path  # an adapter already fetched to the disk cache

    @property
    def url(self) -> str:
        return self.gw.url

    def tenant(
        self, limits: dict[str, int] | None = None, adapters: dict[str, Path] | None = None
    ) -> Tenant:
        name = f"t-{uuid.uuid4().hex[:8]}"
        scopes = {"scopes": ["inference", "adapters:read", "adapters:write", "usage:read"]}
        with self.gw.admin() as admin:
            ok(admin.post("/admin/v1/tenants", json={"name": name, "limits": limits or {}}))
            key = ok(admin.post(f"/admin/v1/tenants/{name}/keys", json=scopes))["key"]
            unused = ok(admin.post(f"/admin/v1/tenants/{name}/keys", json=scopes))["key"]
            for adapter, path in (adapters or {}).items():
                ok(upload(admin, name, adapter, path))
        return Tenant(name, key, unused)

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key, base_url=f"{self.url}/v1", max_retries=0, timeout=3 * ANSWER_WITHIN_S
        )

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.gw.admin_token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=3 * ANSWER_WITHIN_S)

    def chat(self, tenant: Tenant, model: str = BASE, within_s: float = ANSWER_WITHIN_S) -> None:
        """One completion that must succeed; its usage is kept for the ledger check."""
        reply = answer(lambda: self.sdk(tenant.key).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2), within_s)  # fmt: skip
        assert reply.usage is not None
        tenant.returned[reply.id] = (reply.usage.prompt_tokens, reply.usage.completion_tokens)

    def served(self, tenant: Tenant, model: str = BASE) -> bool:
        """A completion: True when served, False when refused with a proper 503."""
        try:
            self.chat(tenant, model)
        except openai.APIStatusError as exc:
            assert_unavailable(exc.response)
            return False
        return True

    def chat_refused(self, key: str, model: str = BASE, within_s: float = ANSWER_WITHIN_S) -> Any:
        """One completion that must be refused with 503; returns the response."""

        def call() -> Any:
            try:
                self.sdk(key).chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
                )
            except openai.APIStatusError as exc:
                return exc.response
            raise AssertionError(f"{model}: served during the outage")

        response = answer(call, within_s)
        assert_unavailable(response)
        return response

    def ready(self) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=3 * ANSWER_WITHIN_S) as c:
            r = answer(lambda: c.get("/ready"))
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
        body: dict[str, Any] = r.json()
        return body

    def breaker_state(self, dependency: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return metric(text, f'loraplex_breaker_state{{dependency="{dependency}"}}')

    def ledger(self, tenant: Tenant) -> tuple[dict[str, tuple[int, int]], int]:
        """The ledger's ok rows (id -> usage) and its error rows' count, for one tenant."""
        rows = self.gw.sql(
            "SELECT u.request_id, u.prompt_tokens, u.completion_tokens, u.status FROM usage_records u "
            "JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s",
            tenant.name,
        )
        assert {r[3] for r in rows} <= {"ok", "error"}, rows
        return {r[0]: (r[1], r[2]) for r in rows if r[3] == "ok"}, sum(
            r[3] == "error" for r in rows
        )

    def assert_ledger_exact(self, tenant: Tenant) -> None:
        """Every request metered exactly once, with the usage the API returned."""
        expected = (tenant.returned, tenant.failed)
        try:
            wait_until(lambda: self.ledger(tenant) == expected, 30)
        except TimeoutError:
            assert self.ledger(tenant) == expected
        assert len(tenant.returned) == len(set(tenant.returned))

    def wait_recovered(self, check: Callable[[], bool]) -> float:
        """Seconds until ``check`` holds once the dependency is back (at most RECOVER_WITHIN_S)."""
        started = time.monotonic()
        wait_until(check, RECOVER_WITHIN_S)
        return time.monotonic() - started


def upload(admin: httpx.Client, tenant: str, name: str, adapter_dir: Path) -> httpx.Response:
    files = [
        (p, (p, (adapter_dir / p).read_bytes(), "application/octet-stream"))
        for p in ("adapter_config.json", "adapter_model.safetensors")
    ]
    return admin.post(f"/admin/v1/tenants/{tenant}/adapters", data={"name": name}, files=files)


def answer(call: Callable[[], T], within_s: float = ANSWER_WITHIN_S) -> T:
    """Run one client call; it must answer (anything) within ``within_s``."""
    started = time.monotonic()
    result = call()
    elapsed = time.monotonic() - started
    assert elapsed < within_s, f"answered after {elapsed:.1f}s"
    return result


def assert_unavailable(r: Any) -> None:
    """503 in the OpenAI error envelope, with a Retry-After."""
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "service_unavailable" and body["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    raise AssertionError(f"{series} not exported")
