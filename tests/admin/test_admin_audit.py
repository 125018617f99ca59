"""The admin audit trail against a real provider and database: one row per audited action
(changes, refusals, exports; not plain reads), who/what/where/outcome right, no secret in
any row or export, filters, cursor paging, exports, append-only; on SQLite too."""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass, field

import httpx
import psycopg
import pytest

from loraplex.gateway.app import create_app
from tests.admin.conftest import CLIENTS, OidcServer, oidc_settings
from tests.admin.oidc_tool import Provider
from tests.gateway.live import live_server


@dataclass
class Flow:
    """Requests made, each with its own request id, and every secret seen on the way."""

    server: OidcServer
    expected: dict[str, dict[str, object] | None] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)

    def call(
        self,
        token: str | None,
        method: str,
        path: str,
        expect: dict[str, object] | None,
        **kwargs: object,
    ) -> httpx.Response:
        rid = f"req-{uuid.uuid4().hex}"
        headers = {"x-request-id": rid}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
            self.secrets.add(token)
        with httpx.Client(base_url=self.server.url, timeout=30) as http:
            r = http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
        self.expected[rid] = None if expect is None else {**expect, "outcome": r.status_code}
        return r


@pytest.fixture(scope="module")
def flow(oidc_server: OidcServer) -> Flow:
    f = Flow(oidc_server)
    p = oidc_server.provider
    f.secrets |= {c.client_secret for c in CLIENTS} | {oidc_server.admin_token}
    admin, viewer, operator = p.token("c-admin"), p.token("c-viewer"), p.token("c-operator")
    issuer = p.issuer
    by_admin = {"actor": "c-admin", "issuer": issuer}

    r = f.call(admin, "POST", "/admin/v1/tenants", {**by_admin, "action": "create_tenant",
               "target": "tenants/acme", "tenant": "acme"}, json={"name": "acme"})  # fmt: skip
    assert r.status_code == 201
    r = f.call(admin, "POST", "/admin/v1/tenants/acme/keys", {**by_admin, "action": "create_key",
               "target": "tenants/acme/keys", "tenant": "acme"}, json={"name": "ci"})  # fmt: skip
    key = r.json()
    f.secrets.add(key["key"])
    rotate = f"tenants/acme/keys/{key['id']}/rotate"
    r = f.call(admin, "POST", f"/admin/v1/{rotate}",
               {**by_admin, "action": "rotate_key", "target": rotate, "tenant": "acme"})  # fmt: skip
    f.secrets.add(r.json()["key"])
    new_key = r.json()
    assert f.call(operator, "GET", "/admin/v1/tenants", None).status_code == 200  # a read
    r = f.call(viewer, "POST", "/admin/v1/tenants", {"actor": "c-viewer", "issuer": issuer,
               "action": "create_tenant", "reason": "forbidden:manage_tenants"},
               json={"name": "nope"})  # fmt: skip
    assert r.status_code == 403
    r = f.call(None, "GET", "/admin/v1/tenants",
               {"actor": "anonymous", "issuer": "", "reason": "no_token"})  # fmt: skip
    assert r.status_code == 401
    r = f.call("not-the-admin-token-0123456789", "DELETE", "/admin/v1/tenants/acme/keys/"
               f"{key['id']}", {"actor": "anonymous", "reason": "bad_token"})  # fmt: skip
    assert r.status_code == 401
    other = p.token("c-admin", resource="https://other.test/api")
    r = f.call(other, "PATCH", "/admin/v1/tenants/acme", {"actor": "anonymous",
               "reason": "audience"}, json={"limits": {}})  # fmt: skip
    assert r.status_code == 401
    r = f.call(oidc_server.admin_token, "PATCH", "/admin/v1/tenants/acme",
               {"actor": "bootstrap-token", "issuer": "", "action": "update_tenant",
                "target": "tenants/acme", "tenant": "acme"},
               json={"limits": {"requests_per_minute": 5}})  # fmt: skip
    assert r.status_code == 200
    r = f.call(new_key["key"], "DELETE", "/admin/v1/tenants/acme/adapters/none",
               {"actor": f"key:{new_key['id']}", "tenant": "acme"})  # fmt: skip
    assert r.status_code in (403, 404)
    r = f.call(viewer, "GET", "/admin/v1/usage/export?tenant=acme&format=jsonl",
               {"actor": "c-viewer", "action": "export_usage", "tenant": "acme"})  # fmt: skip
    assert r.status_code == 200
    return f


def _rows(server: OidcServer, **params: str) -> list[dict[str, object]]:
    with server.client(server.admin_token) as admin:
        r = admin.get("/admin/v1/audit", params={"limit": "1000", **params})
        assert r.status_code == 200, r.text
        return list(r.json()["data"])


def test_one_row_per_audited_action(flow: Flow, oidc_server: OidcServer) -> None:
    rows = _rows(oidc_server)
    by_request: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_request.setdefault(str(row["request_id"]), []).append(row)
    for rid, expect in flow.expected.items():
        got = by_request.get(rid, [])
        if expect is None:
            assert got == [], rid
            continue
        assert len(got) == 1, (rid, got)
        row = got[0]
        assert {k: row[k] for k in expect} == expect, row
        assert row["source"] == "127.0.0.1" and row["at"]


def test_no_secret_in_any_row_or_export(flow: Flow, oidc_server: OidcServer) -> None:
    texts = [json.dumps(_rows(oidc_server))]
    with oidc_server.client(oidc_server.admin_token) as admin:
        for fmt in ("jsonl", "csv"):
            r = admin.get("/admin/v1/audit/export", params={"format": fmt})
            assert r.status_code == 200 and r.text.count("\n") >= len(flow.expected) // 2
            texts.append(r.text)
    pg = oidc_server.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    with psycopg.connect(pg) as conn:
        for table in ("admin_audit", "audit_log"):
            texts.append(repr(conn.execute(f"SELECT * FROM {table}").fetchall()))
    # API keys are lpx_<public prefix>_<secret>: the secret part alone must not show either
    secrets = flow.secrets | {s.split("_", 2)[2] for s in flow.secrets if s.startswith("lpx_")}
    assert len(secrets) >= 15 and min(len(s) for s in secrets) >= 16
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_filters(flow: Flow, oidc_server: OidcServer) -> None:
    def ids(**params: str) -> set[str]:
        return {str(r["request_id"]) for r in _rows(oidc_server, **params)}

    audited = {rid for rid, e in flow.expected.items() if e is not None}
    assert audited <= ids()
    viewer = {rid for rid, e in flow.expected.items() if e and e["actor"] == "c-viewer"}
    assert ids(actor="c-viewer") & audited == viewer and len(viewer) == 2
    denied = ids(outcome="denied")
    assert all(r["outcome"] in (401, 403) for r in _rows(oidc_server, outcome="denied"))
    assert len(denied & audited) >= 4
    assert all(r["outcome"] == 201 for r in _rows(oidc_server, outcome="201"))
    assert all(r["outcome"] < 400 for r in _rows(oidc_server, outcome="ok"))
    assert {r["action"] for r in _rows(oidc_server, action="rotate_key")} == {"rotate_key"}
    assert all(r["tenant"] == "acme" for r in _rows(oidc_server, tenant="acme"))
    keys = _rows(oidc_server, target="tenants/acme/keys")
    assert keys and all(str(r["target"]).startswith("tenants/acme/keys") for r in keys)
    assert ids(**{"from": "2999-01-01"}) == set() and ids(to="2000-01-01") == set()
    assert audited <= ids(**{"from": "2000-01-01", "to": "2999-01-01"})
    with oidc_server.client(oidc_server.admin_token) as admin:
        bad = admin.get("/admin/v1/audit", params={"outcome": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "outcome"
        for cursor in ("9" * 30, "-1", "abc"):
            bad = admin.get("/admin/v1/audit", params={"cursor": cursor})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"


def test_cursor_paging_walks_every_row_once(flow: Flow, oidc_server: OidcServer) -> None:
    everything = [r["id"] for r in _rows(oidc_server)]
    seen: list[object] = []
    cursor: str | None = None
    with oidc_server.client(oidc_server.admin_token) as admin:
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            page = admin.get("/admin/v1/audit", params=params).json()
            seen += [r["id"] for r in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen[: len(everything)] == everything  # newest first, no gap, no repeat
    assert len(set(seen)) == len(seen)


def test_exports(flow: Flow, oidc_server: OidcServer) -> None:
    with oidc_server.client(oidc_server.admin_token) as admin:
        lines = admin.get("/admin/v1/audit/export", params={"actor": "c-admin"}).text
        rows = [json.loads(line) for line in lines.splitlines()]
        assert rows and all(r["actor"] == "c-admin" for r in rows)
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # oldest first
        r = admin.get("/admin/v1/audit/export", params={"format": "csv", "outcome": "denied"})
        assert r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert table and all(row["outcome"] in ("401", "403") for row in table)


def test_append_only_through_the_api(flow: Flow, oidc_server: OidcServer) -> None:
    first = _rows(oidc_server)[-1]
    with oidc_server.client(oidc_server.admin_token) as admin:
        for method in ("PUT", "PATCH", "DELETE", "POST"):
            assert admin.request(method, "/admin/v1/audit").status_code == 405
            r = admin.request(method, f"/admin/v1/audit/{first['id']}")
            assert r.status_code in (404, 405)
    assert _rows(oidc_server)[-1] == first


def test_audit_on_sqlite(oidc_provider: Provider, sqlite_url: str) -> None:
    settings = oidc_settings(sqlite_url, oidc_provider.issuer)
    with live_server(create_app(settings)) as base:
        admin = {"Authorization": f"Bearer {oidc_provider.token('c-admin')}"}
        viewer = {"Authorization": f"Bearer {oidc_provider.token('c-viewer')}"}
        with httpx.Client(base_url=base) as http:
            assert (
                http.post("/admin/v1/plans", json={"name": "x"}, headers=viewer).status_code == 403
            )
            assert (
                http.post("/admin/v1/plans", json={"name": "x"}, headers=admin).status_code == 201
            )
            rows = http.get("/admin/v1/audit", headers=viewer).json()["data"]
            csv_text = http.get("/admin/v1/audit/export?format=csv", headers=viewer).text
    assert [(r["actor"], r["outcome"], r["target"]) for r in rows] == [
        ("c-admin", 201, "plans/x"),
        ("c-viewer", 403, "plans"),
    ]
    assert (
        rows[0]["at"].endswith("Z") and csv_text.count("\n") == 4
    )  # header, 2 rows, the export itself
