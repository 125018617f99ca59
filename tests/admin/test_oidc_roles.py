"""Roles from a real OpenID Provider's access tokens: what each role may and may not do on
the admin API, tenant-admin confined to its tenant, and the 403 in the error envelope."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.admin.conftest import OidcServer


@pytest.fixture(scope="module")
def world(oidc_server: OidcServer) -> Iterator[dict[str, str]]:
    """Tenants acme and globex, a key in each, a plan; made with the admin token."""
    with oidc_server.client(oidc_server.admin_token) as admin:
        ids = {}
        for tenant in ("acme", "globex"):
            assert admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
            r = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"name": "k"})
            ids[tenant] = r.json()["id"]
        assert admin.post("/admin/v1/plans", json={"name": "basic"}).status_code == 201
        yield ids


def _call(client: httpx.Client, method: str, path: str, world: dict[str, str]) -> httpx.Response:
    path = path.format(**world)
    body = None
    if method in ("POST", "PATCH") and path.endswith("/tenants"):
        body = {"name": f"t{len(path)}-{id(client) % 100000}"}
    elif method == "POST" and path.endswith("/plans"):
        body = {"name": f"p-{id(client) % 100000}"}
    elif method == "PATCH" and "/plans/" in path:
        body = {"prompt_price_micros": 5}
    elif method == "PATCH":
        body = {"limits": {}}
    elif method == "POST" and path.endswith("/keys"):
        body = {"name": "more"}
    elif method == "POST" and path.endswith("/gc"):
        body = {"grace_s": 3600}
    return client.request(method, path, json=body)


ANY = [
    ("GET", "/admin/v1/tenants"),
    ("GET", "/admin/v1/tenants/acme"),
    ("GET", "/admin/v1/tenants/globex/keys"),
    ("GET", "/admin/v1/plans"),
    ("GET", "/admin/v1/usage/export?tenant=globex"),
    ("GET", "/admin/v1/audit"),
]
MANAGE = [
    ("POST", "/admin/v1/tenants"),
    ("PATCH", "/admin/v1/tenants/globex"),
    ("POST", "/admin/v1/tenants/globex/keys"),
    ("POST", "/admin/v1/plans"),
    ("PATCH", "/admin/v1/plans/basic"),
]
SYSTEM = [("POST", "/admin/v1/adapters/gc")]

CASES = (
    [("c-admin", m, p, True) for m, p in ANY + MANAGE + SYSTEM]
    + [("c-operator", m, p, True) for m, p in ANY + MANAGE]
    + [("c-operator", m, p, False) for m, p in SYSTEM]
    + [("c-viewer", m, p, True) for m, p in ANY]
    + [("c-viewer", m, p, False) for m, p in MANAGE + SYSTEM]
    + [("c-norole", m, p, False) for m, p in ANY + MANAGE + SYSTEM]
)


def _denied(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 403, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == "insufficient_role"
    assert error["param"] == "role"
    return error


@pytest.mark.parametrize(("client_id", "method", "path", "ok"), CASES)
def test_role_allows_or_forbids(
    oidc_server: OidcServer,
    world: dict[str, str],
    client_id: str,
    method: str,
    path: str,
    ok: bool,
) -> None:
    with oidc_server.as_role(client_id) as client:
        r = _call(client, method, path, world)
    if ok:
        assert r.status_code in (200, 201), (r.status_code, r.text)
    else:
        _denied(r)


TENANT_ADMIN_OK = [
    ("GET", "/admin/v1/tenants/acme"),
    ("GET", "/admin/v1/tenants/acme/keys"),
    ("POST", "/admin/v1/tenants/acme/keys"),
    ("DELETE", "/admin/v1/tenants/acme/keys/{acme}"),
    ("GET", "/admin/v1/tenants/acme/adapters"),
    ("GET", "/admin/v1/usage/export?tenant=acme"),
]
TENANT_ADMIN_FORBIDDEN = [
    ("GET", "/admin/v1/tenants/globex"),
    ("GET", "/admin/v1/tenants/globex/keys"),
    ("POST", "/admin/v1/tenants/globex/keys"),
    ("DELETE", "/admin/v1/tenants/globex/keys/{globex}"),
    ("GET", "/admin/v1/tenants/globex/adapters"),
    ("DELETE", "/admin/v1/tenants/globex/adapters/any"),
    ("GET", "/admin/v1/usage/export?tenant=globex"),
    ("GET", "/admin/v1/usage/export"),  # all tenants
    ("GET", "/admin/v1/tenants"),
    ("PATCH", "/admin/v1/tenants/acme"),  # its own status, limits and plan: the operator's
    ("POST", "/admin/v1/tenants"),
    ("GET", "/admin/v1/plans"),
    ("POST", "/admin/v1/plans"),
    ("GET", "/admin/v1/audit"),
    ("POST", "/admin/v1/adapters/gc"),
]


@pytest.mark.parametrize(("method", "path"), TENANT_ADMIN_OK)
def test_tenant_admin_manages_its_tenant(
    oidc_server: OidcServer, world: dict[str, str], method: str, path: str
) -> None:
    with oidc_server.as_role("c-acme") as client:
        r = _call(client, method, path, world)
    assert r.status_code in (200, 201), (r.status_code, r.text)


@pytest.mark.parametrize(("method", "path"), TENANT_ADMIN_FORBIDDEN)
def test_tenant_admin_is_confined_to_its_tenant(
    oidc_server: OidcServer, world: dict[str, str], method: str, path: str
) -> None:
    with oidc_server.as_role("c-acme") as client:
        error = _denied(_call(client, method, path, world))
    assert "tenant-admin:acme" in error["message"]


def test_me_names_subject_issuer_and_mapped_roles(oidc_server: OidcServer) -> None:
    with oidc_server.as_role("c-acme") as client:
        me = client.get("/admin/v1/me").json()
    assert me["actor"] == "c-acme" and me["issuer"] == oidc_server.provider.issuer
    assert me["roles"] == ["tenant-admin:acme"]  # "unmapped-group" grants nothing
    with oidc_server.client(oidc_server.admin_token) as admin:
        me = admin.get("/admin/v1/me").json()
    assert me == {**me, "actor": "bootstrap-token", "issuer": "", "roles": ["admin"]}
