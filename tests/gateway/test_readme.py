"""The README's "Using the API" examples run as printed (URL and secrets aside) against a
server whose base model is named ``base``, as under ``make serve``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway.live import Gateway

README = Path(__file__).resolve().parents[2] / "README.md"
PRINTED_URL = "http://127.0.0.1:8000"
ERROR_ENVELOPE = re.compile(r'"error"\s*:\s*\{')


@pytest.fixture(scope="module")
def served_model_name() -> str:
    return "base"


def _blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## Using the API") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```(\w*)\n(.*?)```", section, re.S)


def test_readme_examples_run(gateway: Gateway) -> None:
    env = {
        **os.environ,
        "LORAPLEX_API_KEY": gateway.keys["a"],
        "LORAPLEX_ADMIN_TOKEN": gateway.admin_token,
        "LORAPLEX_URL": gateway.url,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    blocks = [(lang, code) for lang, code in _blocks() if "export LORAPLEX_" not in code]
    assert len(blocks) >= 4
    for lang, code in blocks:
        code = code.replace(PRINTED_URL, gateway.url).replace(".venv/bin/loraplex", "loraplex")
        if lang == "python":
            argv = [sys.executable, "-c", code]
        else:  # lines with a placeholder need an id from an earlier command
            runnable = [line for line in code.splitlines() if "<key id>" not in line]
            argv = ["bash", "-euo", "pipefail", "-c", "\n".join(runnable)]
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{code}\n---\n{result.stdout}\n{result.stderr}"
        # an error envelope (a Response object's own "error": null is not one)
        assert not ERROR_ENVELOPE.search(result.stdout), result.stdout
