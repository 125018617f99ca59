"""`loraplex admin tenant|key ...` driving the admin REST API of a real server."""

from __future__ import annotations

import json
import uuid
from typing import Any

from typer.testing import CliRunner

from loraplex.admin_cli import app

runner = CliRunner()


def _run(server: Any, *args: str, token: str | None = None) -> Any:
    result = runner.invoke(
        app, ["--url", server.url, "--token", token or server.admin_token, "--json", *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_tenant_commands(admin_server) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = _run(admin_server, "tenant", "create", name, "--limit", "requests_per_minute=10")
    assert created["name"] == name and created["limits"] == {"requests_per_minute": 10}
    listed = _run(admin_server, "tenant", "list")
    assert name in [t["name"] for t in listed["data"]]
    updated = _run(admin_server, "tenant", "update", name, "--status", "suspended")
    assert updated["status"] == "suspended" and updated["limits"] == {"requests_per_minute": 10}
    updated = _run(admin_server, "tenant", "update", name, "--limit", "tokens_per_minute=500")
    assert updated["limits"] == {"tokens_per_minute": 500}


def test_key_commands(admin_server) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    _run(admin_server, "tenant", "create", name)
    issued = _run(
        admin_server, "key", "create", name, "--scope", "inference", "--scope", "usage:read",
        "--expires-at", "2099-01-01T00:00:00+00:00", "--name", "ci",
    )  # fmt: skip
    assert issued["key"].startswith("lpx_") and issued["scopes"] == ["inference", "usage:read"]
    assert issued["expires_at"].startswith("2099-01-01")
    listed = _run(admin_server, "key", "list", name)["data"]
    assert [k["id"] for k in listed] == [issued["id"]] and "key" not in listed[0]
    rotated = _run(admin_server, "key", "rotate", name, issued["id"])
    assert rotated["key"] != issued["key"] and rotated["name"] == "ci"
    revoked = _run(admin_server, "key", "revoke", name, rotated["id"])
    assert revoked["revoked_at"] is not None


def test_table_output_and_errors(admin_server) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    base = ["--url", admin_server.url, "--token", admin_server.admin_token]
    result = runner.invoke(app, [*base, "tenant", "create", name])
    assert result.exit_code == 0 and name in result.output
    result = runner.invoke(app, [*base, "key", "create", name])
    assert result.exit_code == 0 and "lpx_" in result.output and "shown" in result.output
    result = runner.invoke(app, [*base, "tenant", "create", name])
    assert result.exit_code == 1 and "409" in result.output and "already exists" in result.output
    result = runner.invoke(app, ["--url", admin_server.url, "--token", "wrong", "tenant", "list"])
    assert result.exit_code == 1 and "401" in result.output
    result = runner.invoke(app, [*base, "tenant", "create", "x", "--limit", "nonsense"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["--url", "http://127.0.0.1:9", "--token", "t", "tenant", "list"])
    assert result.exit_code == 2 and "cannot reach" in result.output
