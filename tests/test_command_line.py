"""The command line: help lists everything; bad configuration is one clear line, exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness.cli import SECRET as GOOD_SECRET
from harness.cli import clean_env, loraplex_argv

from loraplex.main import app, command_lines


def loraplex(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):  # type: ignore[no-untyped-def]
    """Run the real ``loraplex`` entry point in a subprocess."""
    return subprocess.run(
        [*loraplex_argv(), *args],
        env=clean_env({"COLUMNS": "200", **(env or {})}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_command_and_option() -> None:
    out = loraplex("--help").stdout
    for command in ["serve", "migrate", "admin"]:
        assert command in out
    for line in command_lines():
        assert line in out, line
    serve = next(line for line in command_lines() if line.startswith("loraplex serve"))
    for option in ["--model", "--device", "--dtype", "--host", "--port", "--data-dir"]:
        assert option in serve
    assert "loraplex migrate downgrade [--revision] [--data-dir]" in command_lines()


def test_serve_help_shows_choices_and_defaults() -> None:
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for text in ["auto|cpu|cuda", "float32", "bfloat16", "127.0.0.1", "8000", "SmolLM2"]:
        assert text in out, text


def assert_config_error(result: subprocess.CompletedProcess[str], setting: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {setting}: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.mark.parametrize("command", [["migrate"], ["serve", "--model", "dummy:tiny"]])
def test_unreachable_database(command: list[str], free_port: int) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port}/loraplex"
    result = loraplex(
        *command, env={"LORAPLEX_DATABASE_URL": url, "LORAPLEX_SECRET_KEY": GOOD_SECRET}
    )
    assert "cannot connect" in assert_config_error(result, "LORAPLEX_DATABASE_URL")


def test_missing_database(pg_url: str) -> None:
    url = pg_url.rsplit("/", 1)[0] + "/lpx_does_not_exist"
    result = loraplex(
        "migrate", env={"LORAPLEX_DATABASE_URL": url, "LORAPLEX_SECRET_KEY": GOOD_SECRET}
    )
    assert "does not exist" in assert_config_error(result, "LORAPLEX_DATABASE_URL")


@pytest.mark.parametrize(
    "url", ["mysql://u@db/x", "postgresql+asyncpg://u@db:notaport/x", "not a url"]
)
def test_bad_database_url(url: str) -> None:
    result = loraplex(
        "serve", env={"LORAPLEX_DATABASE_URL": url, "LORAPLEX_SECRET_KEY": GOOD_SECRET}
    )
    assert_config_error(result, "LORAPLEX_DATABASE_URL")


@pytest.mark.parametrize("secret", [None, "changeme", "short"])
def test_placeholder_secret_in_production(secret: str | None) -> None:
    env = {"LORAPLEX_MODE": "production"}
    if secret is not None:
        env["LORAPLEX_SECRET_KEY"] = secret
    assert_config_error(loraplex("serve", env=env), "LORAPLEX_SECRET_KEY")


def test_placeholder_admin_token_in_production(pg_url: str) -> None:
    env = {
        "LORAPLEX_DATABASE_URL": pg_url,
        "LORAPLEX_SECRET_KEY": GOOD_SECRET,
        "LORAPLEX_ADMIN_TOKEN": "changeme",
    }
    assert_config_error(loraplex("serve", env=env), "LORAPLEX_ADMIN_TOKEN")


@pytest.mark.parametrize(
    ("env", "args", "setting"),
    [
        ({"LORAPLEX_PORT": "eighty"}, [], "LORAPLEX_PORT"),
        ({"LORAPLEX_REDIS_URL": "http://x"}, [], "LORAPLEX_REDIS_URL"),
        ({}, ["--model", "/no/such/model"], "LORAPLEX_MODEL"),
    ],
)
def test_other_bad_settings(
    env: dict[str, str], args: list[str], setting: str, tmp_path: Path
) -> None:
    assert_config_error(loraplex("serve", *args, env=env, cwd=tmp_path), setting)


def test_cuda_without_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = loraplex("serve", "--device", "cuda", "--model", "dummy:tiny", cwd=tmp_path)
    assert_config_error(result, "LORAPLEX_DEVICE")


def test_migrate_up_and_down(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    up = loraplex("migrate", "--data-dir", data)
    assert up.returncode == 0, up.stderr
    assert (tmp_path / "data/loraplex.db").exists()
    assert up.stdout.strip().startswith("database at revision 0002 (admin_audit"), up.stdout
    down = loraplex("migrate", "--data-dir", data, "downgrade", "--revision", "base")
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "database downgraded to revision base (no schema)", down.stdout
    # --data-dir after the subcommand too; the default, one step back, names where it lands
    up = loraplex("migrate", "--data-dir", data)
    down = loraplex("migrate", "downgrade", "--data-dir", data)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "database downgraded to revision 0001 (initial schema)", (
        down.stdout
    )
    again = loraplex("migrate", "--data-dir", data, "--revision", "head")
    assert again.returncode == 0, again.stderr
    bad = loraplex("migrate", "--data-dir", data, "--revision", "nope")
    assert_config_error(bad, "--revision")
