"""``LORAPLEX_ACCESS_LOG``: ``loraplex serve`` writes one application line per request by
default (request id, tenant, model, status, tokens, latency), none when it is false;
``LORAPLEX_LOG_FORMAT=json`` writes it as JSON. The request is served (and metered) the
same either way, and ``export-usage`` with no date finds it (today) and says where it wrote."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from harness.cli import clean_env, loraplex_argv
from harness.services import free_port


def serve_one_request(root: Path, env: dict[str, str]) -> str:
    """Start serve, send one completion with the first-start key, stop; -> its output."""
    port, log = free_port(), root / "serve.log"
    argv = [*loraplex_argv(), "serve", "--model", "dummy:tiny", "--workers", "1",
            "--port", str(port), "--data-dir", str(root / "data")]  # fmt: skip
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, cwd=root, env=clean_env(env), stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=url, timeout=30) as c:
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    if c.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            while "loraplex ready on" not in log.read_text():  # the secrets come before it
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            key = re.search(r"API key:\s+(\S+)", log.read_text())
            assert key is not None, log.read_text()
            body = {"model": "dummy:tiny", "prompt": [5, 6, 7], "max_tokens": 1}
            headers = {"Authorization": f"Bearer {key[1]}", "x-request-id": "req-log-test"}
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return log.read_text()


@pytest.mark.parametrize("setting", [None, "false"])
def test_access_log_setting(tmp_path: Path, setting: str | None) -> None:
    env = {} if setting is None else {"LORAPLEX_ACCESS_LOG": setting}
    out = serve_one_request(tmp_path, env)
    line = re.compile(
        r"req-log-test POST /v1/completions 200 tenant=default model=dummy:tiny tokens=3\+1 "
        r"[0-9.]+ms$"
    )
    found = [ln for ln in out.splitlines() if line.search(ln)]
    assert len(found) == (1 if setting is None else 0), out
    assert '"POST /v1/completions HTTP/1.1" 200' not in out  # uvicorn's own line is off
    if setting is None:  # the usage of today, exported by hand with no --date
        export = subprocess.run(
            [*loraplex_argv(), "export-usage", "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert export.returncode == 0, export.stderr
        where, _, rest = export.stdout.strip().partition(": ")
        assert Path(where).is_absolute() and Path(where).is_file(), export.stdout
        assert rest.startswith("1 rows"), export.stdout


def test_json_logs(tmp_path: Path) -> None:
    out = serve_one_request(tmp_path, {"LORAPLEX_LOG_FORMAT": "json"})
    records = []
    for ln in out.splitlines():
        if ln.startswith("{"):
            records.append(json.loads(ln))
    started = [r["message"] for r in records if r["logger"] == "loraplex.engine.start"]
    assert any(m.startswith("loading the model dummy:tiny on cpu (float32)") for m in started)
    assert any(m.startswith("model loaded in ") for m in started), started
    (request,) = [r for r in records if r.get("request_id") == "req-log-test"]
    assert request["logger"] == "loraplex.request" and request["level"] == "info"
    expected = {"method": "POST", "path": "/v1/completions", "status": 200,
                "tenant": "default", "model": "dummy:tiny", "prompt_tokens": 3,
                "completion_tokens": 1}  # fmt: skip
    assert {k: request[k] for k in expected} == expected, request
    assert isinstance(request["latency_ms"], float) and "ts" in request
