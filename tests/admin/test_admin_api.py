"""The admin REST API against a real server and database: tenants, keys, audit, auth."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg

from loraplex.tenancy.bootstrap import new_admin_token
from loraplex.tenancy.keys import hash_secret


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _pg(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"]
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_admin_token_required(admin_server) -> None:
    with httpx.Client(base_url=admin_server.url) as anon:
        err = _error(anon.get("/admin/v1/tenants"), 401)
        assert err["type"] == "authentication_error"
    with admin_server.client("not-the-token-at-all") as wrong:
        _error(wrong.get("/admin/v1/tenants"), 401)


def test_bootstrap_admin_token_when_none_is_configured(bootstrap_server) -> None:
    token = new_admin_token()
    with psycopg.connect(_pg(bootstrap_server.database_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO admin_tokens (id, name, token_hash, created_at) "
            "VALUES (%s, 'bootstrap', %s, now())",
            (uuid.uuid4(), hash_secret(bootstrap_server.secret_key, token)),
        )
        with bootstrap_server.client(token) as client:
            assert client.get("/admin/v1/tenants").status_code == 200
            _error(client.get("/admin/v1/tenants", headers={"Authorization": "Bearer x"}), 401)
            conn.execute("UPDATE admin_tokens SET revoked_at = now()")
            _error(client.get("/admin/v1/tenants"), 401)


def test_bootstrap_token_is_refused_when_a_token_is_configured(admin_server) -> None:
    token = new_admin_token()
    with psycopg.connect(_pg(admin_server.database_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO admin_tokens (id, name, token_hash, created_at) "
            "VALUES (%s, 'bootstrap', %s, now())",
            (uuid.uuid4(), hash_secret(admin_server.secret_key, token)),
        )
    with admin_server.client(token) as client:
        _error(client.get("/admin/v1/tenants"), 401)


def test_tenant_lifecycle_and_audit(admin, admin_server) -> None:
    name = _name()
    r = admin.post("/admin/v1/tenants", json={"name": name, "limits": {"requests_per_minute": 60}})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "active" and created["limits"] == {"requests_per_minute": 60}

    assert name in [t["name"] for t in admin.get("/admin/v1/tenants").json()["data"]]
    assert admin.get(f"/admin/v1/tenants/{name}").json()["id"] == created["id"]

    # PATCH merges limits (RFC 7396): named fields set, null removes one, the rest kept.
    r = admin.patch(
        f"/admin/v1/tenants/{name}", json={"status": "suspended", "limits": {"max_concurrent": 2}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "suspended"
    assert r.json()["limits"] == {"requests_per_minute": 60, "max_concurrent": 2}
    r = admin.patch(f"/admin/v1/tenants/{name}", json={"limits": {"requests_per_minute": None}})
    assert r.json()["limits"] == {"max_concurrent": 2}, r.text

    with psycopg.connect(_pg(admin_server.database_url)) as conn:
        actions = [
            row[0]
            for row in conn.execute(
                "SELECT action FROM audit_log WHERE target = %s ORDER BY id", (name,)
            )
        ]
    assert actions == ["tenant.create", "tenant.update", "tenant.update"]


def test_tenant_errors(admin) -> None:
    name = _name()
    assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
    assert _error(admin.post("/admin/v1/tenants", json={"name": name}), 409)["code"] == "conflict"
    assert (
        _error(admin.post("/admin/v1/tenants", json={"name": "Bad Name!"}), 400)["param"] == "name"
    )
    err = _error(admin.post("/admin/v1/tenants", json={"name": _name(), "color": "red"}), 400)
    assert "color" in err["message"]
    err = _error(admin.post("/admin/v1/tenants", json={"name": _name(), "limits": {"rpm": 1}}), 400)
    assert "rpm" in err["message"]
    _error(admin.post("/admin/v1/tenants", json={"name": _name(), "plan": "no-such-plan"}), 404)
    _error(admin.patch("/admin/v1/tenants/nobody-here", json={"status": "active"}), 404)
    _error(admin.patch(f"/admin/v1/tenants/{name}", json={"status": "deleted"}), 400)


def test_key_lifecycle(admin, admin_server) -> None:
    name = _name()
    admin.post("/admin/v1/tenants", json={"name": name})
    r = admin.post(
        f"/admin/v1/tenants/{name}/keys", json={"name": "ci", "scopes": ["inference", "usage:read"]}
    )
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["key"].startswith(f"lpx_{issued['prefix']}_")
    assert issued["scopes"] == ["inference", "usage:read"]

    listed = admin.get(f"/admin/v1/tenants/{name}/keys").json()["data"]
    assert [k["id"] for k in listed] == [issued["id"]]
    assert "key" not in listed[0]

    rotated = admin.post(f"/admin/v1/tenants/{name}/keys/{issued['id']}/rotate")
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["id"] != issued["id"] and new["key"] != issued["key"]
    assert new["scopes"] == issued["scopes"] and new["name"] == "ci"
    by_id = {k["id"]: k for k in admin.get(f"/admin/v1/tenants/{name}/keys").json()["data"]}
    assert by_id[issued["id"]]["revoked_at"] is not None
    assert by_id[new["id"]]["revoked_at"] is None

    revoked = admin.delete(f"/admin/v1/tenants/{name}/keys/{new['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    again = admin.delete(f"/admin/v1/tenants/{name}/keys/{new['id']}")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    _error(admin.post(f"/admin/v1/tenants/{name}/keys/{new['id']}/rotate"), 400)

    with psycopg.connect(_pg(admin_server.database_url)) as conn:
        (secret_hash,) = conn.execute(
            "SELECT secret_hash FROM api_keys WHERE id = %s", (uuid.UUID(issued["id"]),)
        ).fetchone()
    assert issued["key"].split("_", 2)[2] not in secret_hash  # only the keyed hash is stored
    with psycopg.connect(_pg(admin_server.database_url)) as conn:
        actions = sorted(
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_log a JOIN tenants t ON t.id = a.tenant_id WHERE t.name = %s",
                (name,),
            )
        )
    assert actions == ["key.create", "key.revoke", "key.rotate", "tenant.create"]


def test_key_errors(admin) -> None:
    name = _name()
    admin.post("/admin/v1/tenants", json={"name": name})
    keys = f"/admin/v1/tenants/{name}/keys"
    assert _error(admin.post(keys, json={"scopes": ["root"]}), 400)["param"] == "scopes"
    assert _error(admin.post(keys, json={"scopes": []}), 400)["param"] == "scopes"
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert _error(admin.post(keys, json={"expires_at": past}), 400)["param"] == "expires_at"
    naive = (datetime.now() + timedelta(days=1)).replace(tzinfo=None).isoformat()
    assert _error(admin.post(keys, json={"expires_at": naive}), 400)["param"] == "expires_at"
    _error(admin.post("/admin/v1/tenants/nobody-here/keys", json={}), 404)
    _error(admin.delete(f"{keys}/{uuid.uuid4()}"), 404)
    _error(admin.delete(f"{keys}/not-a-uuid"), 400)
    # Another tenant's key id is not found under this tenant.
    other = _name()
    admin.post("/admin/v1/tenants", json={"name": other})
    theirs = admin.post(f"/admin/v1/tenants/{other}/keys", json={}).json()
    _error(admin.delete(f"{keys}/{theirs['id']}"), 404)


def test_control_plane_only_server_answers_inference_with_503(admin, admin_server) -> None:
    """No engine in this server: keys authenticate, inference is 503 in the envelope."""
    name = _name()
    admin.post("/admin/v1/tenants", json={"name": name})
    key = admin.post(f"/admin/v1/tenants/{name}/keys", json={}).json()["key"]
    with httpx.Client(base_url=admin_server.url, headers={"Authorization": f"Bearer {key}"}) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base"]
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        err = _error(c.post("/v1/chat/completions", json=body), 503)
        assert err["code"] == "service_unavailable"
