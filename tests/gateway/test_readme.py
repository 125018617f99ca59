"""The README's "Using the API" examples run as printed (URL and secrets aside) against a
server whose base model is named ``base``, as under ``make serve``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def test_readme_examples_run(
    gateway: Gateway, tiny_llama_dir: Path, make_peft_adapter: Any, tmp_path: Path
) -> None:
    import shutil

    import httpx

    # the adapter upload example sends ./my-lora (as save_pretrained writes it) to `default`
    shutil.copytree(make_peft_adapter(tiny_llama_dir, rank=4), tmp_path / "my-lora")
    (tmp_path / "my-lora" / "README.md").write_text("model card\n")
    httpx.post(
        f"{gateway.url}/admin/v1/tenants",
        json={"name": "default"},
        headers={"Authorization": f"Bearer {gateway.admin_token}"},
    )  # 409 on the second run over the same gateway
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
        result = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{code}\n---\n{result.stdout}\n{result.stderr}"
        # an error envelope (a Response object's own "error": null is not one)
        assert not ERROR_ENVELOPE.search(result.stdout), result.stdout


def test_readme_examples_ask_for_temperature_0() -> None:
    """Each generating example asks for greedy decoding (the default model is tiny)."""
    python = [code for lang, code in _blocks() if lang == "python"]
    assert python
    for code in python:
        assert code.count("completions.create(") == code.count("temperature=0"), code
    for body in re.findall(r"-d '(\{.*?\})'", _section_text(), re.S):
        data = json.loads(body)
        if "messages" in data or "prompt" in data:
            assert data.get("temperature") == 0, body


def _section_text() -> str:
    text = README.read_text()
    section = text[text.index("## Using the API") :]
    return section[: section.index("\n## ", 1)]


def test_readme_first_example_answers_sensibly_on_smollm2(tmp_path: Path) -> None:
    """The README's first chat example, run as printed on the default model (SmolLM2-135M,
    the GGUF `make serve` loads), says what the README says it says."""
    import secrets

    import httpx

    from loraplex.engine.config import EngineConfig
    from loraplex.engine.model.loader import default_model_path
    from loraplex.engine_wiring import inproc_engine
    from loraplex.gateway.app import create_app
    from loraplex.gateway.settings import GatewaySettings
    from tests.gateway.live import fresh_database, live_server

    model = str(default_model_path())
    token = secrets.token_hex(16)
    with fresh_database() as url:
        settings = GatewaySettings(
            database_url=url, admin_token=token, secret_key=secrets.token_hex(32),
            data_dir=tmp_path, model=model, served_model_name="base",
        )  # fmt: skip
        config = EngineConfig(device="cpu", max_num_seqs=2)
        app = create_app(settings, engine_factory=lambda: inproc_engine(settings, model, config))
        with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as c:
            auth = {"Authorization": f"Bearer {token}"}
            assert c.post("/admin/v1/tenants", json={"name": "t"}, headers=auth).status_code == 201
            key = c.post("/admin/v1/tenants/t/keys", json={}, headers=auth).json()["key"]
            for _ in range(600):
                if c.get("/ready").status_code == 200:
                    break
                time.sleep(0.2)
            curl = next(code for _, code in _blocks() if "capital of France" in code)
            first = curl.split("\n\n")[0].replace(PRINTED_URL, base)
            env = {**os.environ, "LORAPLEX_API_KEY": key}
            result = subprocess.run(["bash", "-c", first], env=env, capture_output=True,
                                    text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)["choices"][0]["message"]["content"]
    assert "The capital of France is Paris." in answer, answer
    assert '"The capital of France is Paris."' in README.read_text()
