"""The console's security over HTTP, with sessions from real logins at the provider's form:
CSRF, the Content-Security-Policy and other headers, cookie flags, roles (a viewer cannot
change anything, a tenant admin sees its tenant only), the admin token's login, logout."""

from __future__ import annotations

import httpx
from console_live import ConsoleServer, csrf_of, sso_login


def _tenant(server: ConsoleServer, name: str) -> None:
    with server.admin() as admin:
        r = admin.post("/admin/v1/tenants", json={"name": name})
        assert r.status_code in (201, 409), r.text


def test_pages_carry_a_strict_policy_and_need_a_login(console_server: ConsoleServer) -> None:
    with httpx.Client(base_url=console_server.url) as anon:
        r = anon.get("/console/tenants")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
        r = anon.get("/console/login")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "<script>" not in r.text
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
        assert anon.get("/console/static/chart.umd.min.js").status_code == 200
        # anonymous API calls stay refused (a cookie is the only other way in)
        assert anon.get("/admin/v1/tenants").status_code == 401


def test_session_cookie_flags_and_csrf(console_server: ConsoleServer) -> None:
    _tenant(console_server, "acme")
    with sso_login(console_server.url, "tara") as tara:
        cookie = next(c for c in tara.cookies.jar if c.name == "lpx_console")
        assert cookie.has_nonstandard_attr("HttpOnly")
        assert cookie.get_nonstandard_attr("SameSite", "").lower() == "lax"
        assert not cookie.secure  # plain http here; https sets Secure
        page = tara.get("/console/tenants/acme")
        assert page.status_code == 200
        token = csrf_of(page.text)
        path = "/admin/v1/tenants/acme/keys"
        body = {"name": "csrf-check", "scopes": ["inference"]}
        refused = tara.post(path, json=body)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed"
        wrong = tara.post(path, json=body, headers={"X-CSRF-Token": token[:-2] + "xx"})
        assert wrong.status_code == 403
        made = tara.post(path, json=body, headers={"X-CSRF-Token": token})
        assert made.status_code == 201, made.text
        secret = made.json()["key"]
        assert secret not in tara.get("/console/tenants/acme").text  # shown once, in the answer
        with console_server.admin() as admin:
            rows = admin.get("/admin/v1/audit", params={"actor": "tara"}).json()["data"]
        reasons = [r["reason"] for r in rows if r["action"] == "create_key"]
        assert sorted(reasons) == ["", "csrf", "csrf"]


def test_viewer_sees_but_cannot_change(console_server: ConsoleServer) -> None:
    _tenant(console_server, "acme")
    with sso_login(console_server.url, "vera") as vera:
        page = vera.get("/console/tenants")
        assert page.status_code == 200 and "acme" in page.text
        assert 'id="create-tenant"' not in page.text
        detail = vera.get("/console/tenants/acme").text
        assert 'id="create-key"' not in detail and 'id="upload-adapter"' not in detail
        r = vera.post(
            "/admin/v1/tenants",
            json={"name": "by-viewer"},
            headers={"X-CSRF-Token": csrf_of(page.text)},
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
        assert vera.get("/console/audit").status_code == 200


def test_tenant_admin_sees_its_tenant_only(console_server: ConsoleServer) -> None:
    _tenant(console_server, "acme")
    _tenant(console_server, "globex")
    with sso_login(console_server.url, "tara") as tara:
        page = tara.get("/console/tenants").text
        assert 'data-tenant="acme"' in page and 'data-tenant="globex"' not in page
        assert tara.get("/console/tenants/globex").status_code == 403
        assert tara.get("/admin/v1/tenants/globex").status_code == 403
        assert tara.get("/console/audit").status_code == 403
        assert tara.get("/console/usage?tenant=globex").status_code == 403
        usage = tara.get("/admin/v1/usage/series", params={"tenant": "acme"})
        assert usage.status_code == 200 and usage.json()["granularity"] == "hour"


def test_no_role_no_session(console_server: ConsoleServer) -> None:
    try:
        with sso_login(console_server.url, "nobody"):
            pass
    except AssertionError as exc:
        assert "holds no role" in str(exc)
    else:
        raise AssertionError("a login without a role got a session")
    with console_server.admin() as admin:
        rows = admin.get("/admin/v1/audit", params={"action": "console_login"}).json()["data"]
    assert any(r["outcome"] == 401 and r["reason"] == "no_role" for r in rows)


def test_admin_token_login_and_logout(console_server: ConsoleServer) -> None:
    with httpx.Client(base_url=console_server.url, timeout=30.0) as c:
        page = c.get("/console/login")
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        bad = c.post("/console/login/token", data={"token": "wrong", "csrf": csrf})
        assert bad.status_code == 401
        page = c.get("/console/login")
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        r = c.post("/console/login/token", data={"token": console_server.admin_token, "csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/console/tenants"
        tenants = c.get("/console/tenants")
        assert tenants.status_code == 200 and "bootstrap-token" in tenants.text
        assert console_server.admin_token not in tenants.text
        out = c.post("/console/logout", data={"csrf": csrf_of(tenants.text)})
        assert out.status_code == 303
        assert c.get("/console/tenants").status_code == 303  # logged out
