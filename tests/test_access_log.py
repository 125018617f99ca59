"""``LORAPLEX_ACCESS_LOG``: ``loraplex serve`` writes uvicorn's line per request by default,
none when it is false; the request is served (and metered) the same either way."""

from __future__ import annotations

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
            key = re.search(r"API key:\s+(\S+)", log.read_text())
            assert key is not None, log.read_text()
            body = {"model": "dummy:tiny", "prompt": [5, 6, 7], "max_tokens": 1}
            r = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key[1]}"})
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
    access = re.findall(r'"POST /v1/completions HTTP/1\.1" 200', out)
    assert len(access) == (1 if setting is None else 0), out
