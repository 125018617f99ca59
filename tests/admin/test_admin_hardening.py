"""Admin API regressions of issue #15: strict numbers, whole-string names, JSON read
strictly, times with their zone (also on SQLite, which stores them without)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings
from tests.gateway.envelope import error
from tests.gateway.live import live_server


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/v1/plans", {"name": "p-bool", "prompt_price_micros": True}, "prompt_price_micros"),
        ("/admin/v1/plans", {"name": "p-float", "completion_price_micros": 1.5}, None),
        ("/admin/v1/plans", {"name": "p-neg", "prompt_price_micros": -1}, None),
        ("/admin/v1/adapters/gc", {"grace_s": True}, "grace_s"),
        ("/admin/v1/adapters/gc", {"grace_s": 1e300}, "grace_s"),
    ],
)
def test_numbers_are_strict(admin: httpx.Client, path: str, body: dict, param: str | None) -> None:
    err = error(admin.post(path, json=body), 400)
    assert param is None or err["param"] == param, err


def test_alias_version_is_not_a_bool(admin: httpx.Client) -> None:
    name = f"t-{secrets.token_hex(4)}"
    assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
    r = admin.put(f"/admin/v1/tenants/{name}/adapters/a/aliases/prod", json={"version": True})
    error(r, 400, param="version")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/admin/v1/tenants", "acme\n"),
        ("/admin/v1/plans", "pro\n"),
        ("/admin/v1/tenants", "Acme"),
        ("/admin/v1/tenants", "a\ud800"),
    ],
)
def test_names_match_to_the_end(admin: httpx.Client, path: str, name: str) -> None:
    raw = json.dumps({"name": name}).encode()
    error(admin.post(path, content=raw, headers={"content-type": "application/json"}), 400)


def test_created_tenant_answers_at_its_url(admin: httpx.Client) -> None:
    name = f"t-{secrets.token_hex(4)}_x"
    assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
    assert admin.get(f"/admin/v1/tenants/{name}").json()["name"] == name


@pytest.mark.parametrize(
    "raw",
    [b'{"name": "a", "name": "b"}', b'{"name": "a", "limits": {"x": NaN}}', b"\xff"],
    ids=["duplicate key", "NaN", "not UTF-8"],
)
def test_json_is_read_strictly(admin: httpx.Client, raw: bytes) -> None:
    r = admin.post("/admin/v1/tenants", content=raw, headers={"content-type": "application/json"})
    assert error(r, 400)["message"].startswith("request body is not valid JSON")


def test_other_media_types_are_415(admin: httpx.Client) -> None:
    error(admin.post("/admin/v1/tenants", content=b"name=a"), 415)


@pytest.fixture(scope="module")
def sqlite_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """An embedded-mode server: SQLite hands times back without their zone."""
    from harness import services

    path = tmp_path_factory.mktemp("sqlite-admin") / "loraplex.db"
    url = f"sqlite+aiosqlite:///{path}"
    services.migrate(url)
    token = secrets.token_hex(16)
    settings = GatewaySettings(
        database_url=url, admin_token=token, secret_key=secrets.token_hex(32), data_dir=path.parent
    )
    with live_server(create_app(settings)) as base:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            yield client


def test_times_are_utc_with_their_zone_on_sqlite(sqlite_admin: httpx.Client) -> None:
    assert sqlite_admin.post("/admin/v1/plans", json={"name": "pro"}).status_code == 201
    assert sqlite_admin.post("/admin/v1/tenants", json={"name": "acme"}).status_code == 201
    times = [p["created_at"] for p in sqlite_admin.get("/admin/v1/plans").json()["data"]]
    times += [sqlite_admin.get("/admin/v1/plans/pro").json()["created_at"]]
    times += [sqlite_admin.get("/admin/v1/tenants/acme").json()["updated_at"]]
    for value in times:
        assert datetime.fromisoformat(value).utcoffset() == UTC.utcoffset(None), value
