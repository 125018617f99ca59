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
    # --limit merges: the limit named is set, the others kept; NAME=none removes one
    updated = _run(admin_server, "tenant", "update", name, "--limit", "tokens_per_minute=500")
    assert updated["limits"] == {"requests_per_minute": 10, "tokens_per_minute": 500}
    updated = _run(admin_server, "tenant", "update", name, "--limit", "requests_per_minute=none")
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
    assert "scopes: inference\n" in result.output and "['" not in result.output
    key_id = result.output.split("key id: ", 1)[1].split()[0]
    assert len(key_id) == 36, result.output
    result = runner.invoke(app, [*base, "tenant", "create", name])
    assert result.exit_code == 1 and "409" in result.output and "already exists" in result.output
    result = runner.invoke(app, ["--url", admin_server.url, "--token", "wrong", "tenant", "list"])
    assert result.exit_code == 1 and "401" in result.output
    result = runner.invoke(app, [*base, "tenant", "create", "x", "--limit", "nonsense"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["--url", "http://127.0.0.1:9", "--token", "t", "tenant", "list"])
    assert result.exit_code == 2 and "cannot reach" in result.output


def test_full_ids_prefixes_and_json_anywhere(admin_server) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    base = ["--url", admin_server.url, "--token", admin_server.admin_token]
    _run(admin_server, "tenant", "create", name)
    first = _run(admin_server, "key", "create", name, "--name", "a-rather-long-key-label")
    # a table on an 80-column terminal still shows the whole id, on one line
    result = runner.invoke(app, [*base, "key", "list", name], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert first["id"] in result.output, result.output
    # --json after the subcommand and its arguments
    listed = runner.invoke(app, [*base, "key", "list", name, "--json"])
    assert listed.exit_code == 0, listed.output
    assert [k["id"] for k in json.loads(listed.output)["data"]] == [first["id"]]
    # a unique start of the id, as git takes commits
    rotated = _run(admin_server, "key", "rotate", name, first["id"][:6])
    assert rotated["key"] != first["key"]
    # a start the two keys (the rotated one is listed, revoked) share is ambiguous
    ids = [first["id"], rotated["id"]]
    common = next(i for i in range(36) if ids[0][i] != ids[1][i])
    result = runner.invoke(app, [*base, "key", "revoke", name, ids[0][:common]])
    if common:
        assert result.exit_code == 1 and "2 keys" in result.output, result.output
    result = runner.invoke(app, [*base, "key", "revoke", name, "zzzz"])
    assert result.exit_code == 1 and "no key" in result.output, result.output
    revoked = _run(admin_server, "key", "revoke", name, rotated["id"][: common + 1])
    assert revoked["id"] == rotated["id"] and revoked["revoked_at"] is not None


def test_plan_commands(admin_server) -> None:
    from loraplex.main import app as root

    plan, tenant = f"plan-{uuid.uuid4().hex[:8]}", f"cli-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> Any:
        argv = ["admin", "--url", admin_server.url, "--token", admin_server.admin_token]
        result = runner.invoke(root, [*argv, *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    created = run("plan", "create", plan, "--prompt-price", "100", "--limit",
                  "requests_per_minute=5", "--limit", "max_concurrent=2")  # fmt: skip
    assert created["prompt_price_micros"] == 100 and created["completion_price_micros"] == 0
    assert plan in [p["name"] for p in run("plan", "list")["data"]]
    updated = run(
        "plan", "update", plan, "--completion-price", "300", "--limit", "max_concurrent=none"
    )
    assert updated["completion_price_micros"] == 300 and updated["prompt_price_micros"] == 100
    assert updated["limits"] == {"requests_per_minute": 5}
    assert run("plan", "show", plan)["completion_price_micros"] == 300
    run("tenant", "create", tenant, "--plan", plan)
    assert run("tenant", "update", tenant, "--no-plan")["plan"] is None
