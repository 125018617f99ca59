"""The console's session cookie: sealed (encrypted and authenticated) with a key derived from
the secret key; tampered, expired, other-purpose or other-key values are refused."""

from __future__ import annotations

import time

from starlette.requests import Request

from loraplex.admin.console.session import ConsoleSession, csrf_ok, seal, secure, unseal
from loraplex.admin.roles import Role

KEY = "k" * 64


def _request(method: str = "POST", scheme: str = "http", headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": method, "scheme": scheme, "path": "/",
                    "headers": raw, "query_string": b"", "server": ("x", 80)})  # fmt: skip


def test_sealed_values_are_opaque_and_checked() -> None:
    session = ConsoleSession.new(
        "alice", "https://idp", (Role("tenant-admin", "acme"),), "oidc", 60
    )
    value = seal(KEY, "session", session.payload())
    assert "alice" not in value and session.csrf not in value
    back = ConsoleSession.from_payload(unseal(KEY, "session", value) or {})
    assert back == session
    assert unseal(KEY, "login", value) is None  # sealed for another purpose
    assert unseal("j" * 64, "session", value) is None  # another server's key
    tampered = value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB")
    assert unseal(KEY, "session", tampered) is None
    expired = seal(KEY, "session", {**session.payload(), "exp": time.time() - 1})
    assert unseal(KEY, "session", expired) is None


def test_csrf_token_needed_for_changes_only() -> None:
    session = ConsoleSession.new("alice", "", (Role("admin"),), "token", 60)
    assert csrf_ok(_request("GET"), session)
    assert not csrf_ok(_request("POST"), session)
    assert not csrf_ok(_request("DELETE", headers={"X-CSRF-Token": "nope"}), session)
    assert csrf_ok(_request("PATCH", headers={"X-CSRF-Token": session.csrf}), session)


def test_cookies_are_secure_over_https() -> None:
    assert secure(_request(scheme="https"), None)
    assert not secure(_request(scheme="http"), None)
    assert secure(_request(scheme="http"), "https://admin.example.com")  # behind a proxy
