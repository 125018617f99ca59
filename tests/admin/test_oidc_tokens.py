"""Access tokens from a real OpenID Provider: expired, another issuer, another audience,
the provider rotating its signing key (JWKS re-fetched on the new kid, rate-limited), the
admin token turned off, and bad issuer configuration stopping start-up with one line."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest

from loraplex.gateway.app import create_app
from loraplex.tenancy.settings import ConfigError
from tests.admin.conftest import CLIENTS, OidcServer, oidc_settings
from tests.admin.oidc_tool import Provider, running_provider
from tests.gateway.live import fresh_database, live_server
from tests.test_command_line import assert_config_error, loraplex


def _refused(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 401, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_token"
    return error


def _fetches(server: OidcServer) -> int:
    return int(server.app.state.services.oidc.jwks_fetches)


def _claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_expired_token(oidc_server: OidcServer) -> None:
    # lives 4 s (the first request must land inside them, on a loaded box too); the server's
    # leeway is 0, so a second past its "exp" the same token is refused
    token = oidc_server.provider.token("c-short")
    with oidc_server.client(token) as client:
        assert client.get("/admin/v1/tenants").status_code == 200
        time.sleep(max(0.0, _claims(token)["exp"] - time.time()) + 1.2)
        assert "expired" in _refused(client.get("/admin/v1/tenants"))["message"]


def test_token_from_another_issuer(oidc_server: OidcServer) -> None:
    with running_provider(CLIENTS) as other:
        token = other.token("c-admin")
    with oidc_server.client(token) as client:
        _refused(client.get("/admin/v1/tenants"))


def test_token_for_another_audience(oidc_server: OidcServer) -> None:
    token = oidc_server.provider.token("c-admin", resource="https://other.test/api")
    with oidc_server.client(token) as client:
        assert "'aud'" in _refused(client.get("/admin/v1/tenants"))["message"]


def _with_kid(token: str, kid: str) -> str:
    head, body, sig = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    header["kid"] = kid
    raw = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{raw}.{body}.{sig}"


def test_key_rotation_is_followed(oidc_server: OidcServer) -> None:
    provider = oidc_server.provider
    before_rotation = provider.token("c-admin")
    new_kid = provider.rotate()
    after_rotation = provider.token("c-admin")
    header = json.loads(base64.urlsafe_b64decode(after_rotation.split(".")[0] + "=="))
    assert header["kid"] == new_kid
    time.sleep(0.6)  # past the server's minimum interval between JWKS fetches
    fetches = _fetches(oidc_server)
    with oidc_server.client(after_rotation) as client:
        assert client.get("/admin/v1/tenants").status_code == 200
    assert _fetches(oidc_server) == fetches + 1  # the unknown kid made one fetch
    with oidc_server.client(before_rotation) as client:  # the old key is still published
        assert client.get("/admin/v1/tenants").status_code == 200
    assert _fetches(oidc_server) == fetches + 1


def test_unknown_kids_are_fetched_at_most_once_per_interval(oidc_server: OidcServer) -> None:
    token = oidc_server.provider.token("c-admin")
    time.sleep(0.6)  # the server's interval is 0.5 s
    fetches = _fetches(oidc_server)
    started = time.monotonic()
    with oidc_server.client(token) as client:
        for n in range(10):
            bearer = {"Authorization": f"Bearer {_with_kid(token, f'made-up-{n}')}"}
            r = client.get("/admin/v1/tenants", headers=bearer)
            assert "unknown key" in _refused(r)["message"]
    elapsed = time.monotonic() - started
    made = _fetches(oidc_server) - fetches
    assert 1 <= made <= 1 + int(elapsed / 0.5), (made, elapsed)


def test_forged_signature_is_refused(oidc_server: OidcServer) -> None:
    token = oidc_server.provider.token("c-admin")
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["realm_access"] = {"roles": ["platform-admins"]}
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with oidc_server.client(f"{head}.{forged}.{sig}") as client:
        assert "signature" in _refused(client.get("/admin/v1/tenants"))["message"]


def test_admin_token_turned_off(oidc_provider: Provider) -> None:
    with fresh_database() as url:
        settings = oidc_settings(url, oidc_provider.issuer, admin_token_enabled=False)
        with live_server(create_app(settings)) as base:
            with httpx.Client(base_url=base) as http:
                bearer = {"Authorization": f"Bearer {settings.admin_token}"}
                r = http.get("/admin/v1/tenants", headers=bearer)
                assert r.status_code == 401 and "turned off" in r.json()["error"]["message"]
                bearer = {"Authorization": f"Bearer {oidc_provider.token('c-admin')}"}
                assert http.get("/admin/v1/tenants", headers=bearer).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"oidc_issuer": "not a url"}, "LORAPLEX_OIDC_ISSUER"),
        ({"oidc_issuer": "http://idp.example.com"}, "LORAPLEX_OIDC_ISSUER"),  # not https
        ({"oidc_audience": None}, "LORAPLEX_OIDC_AUDIENCE"),
        ({"oidc_role_map": {"g": "superuser"}}, "LORAPLEX_OIDC_ROLE_MAP"),
        ({"oidc_role_claim": "a..b"}, "LORAPLEX_OIDC_ROLE_CLAIM"),
        ({"oidc_issuer": None, "admin_token_enabled": False}, "LORAPLEX_ADMIN_TOKEN_ENABLED"),
    ],
)
def test_bad_oidc_settings(overrides: dict[str, object], setting: str) -> None:
    with pytest.raises(ValueError) as info:
        oidc_settings("sqlite+aiosqlite:///x.db", "https://idp.example.com", **overrides)
    cause = info.value.errors()[0]["ctx"]["error"]  # type: ignore[attr-defined]
    assert isinstance(cause, ConfigError) and cause.setting == setting


def test_unreachable_issuer_stops_serve_with_one_line(tmp_path: Path, free_port: int) -> None:
    env = {"LORAPLEX_OIDC_ISSUER": f"http://127.0.0.1:{free_port}"}
    env["LORAPLEX_OIDC_AUDIENCE"] = "https://loraplex.test/admin"
    result = loraplex("serve", "--model", "dummy:tiny", env=env, cwd=tmp_path)
    line = assert_config_error(result, "LORAPLEX_OIDC_ISSUER")
    assert "discovery document" in line


def test_malformed_issuer_stops_serve_with_one_line(tmp_path: Path) -> None:
    env = {"LORAPLEX_OIDC_ISSUER": "ftp://idp", "LORAPLEX_OIDC_AUDIENCE": "x"}
    result = loraplex("serve", "--model", "dummy:tiny", env=env, cwd=tmp_path)
    assert_config_error(result, "LORAPLEX_OIDC_ISSUER")


def test_no_admin_token_is_minted_when_turned_off(sqlite_url: str) -> None:
    from loraplex.serve import run_bootstrap

    settings = oidc_settings(
        sqlite_url, "https://idp.example.com", admin_token=None, admin_token_enabled=False
    )
    result = run_bootstrap(settings)
    assert result.admin_token is None and result.api_key is not None
    assert "Admin token" not in result.banner()
