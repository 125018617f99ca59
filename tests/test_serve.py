"""``loraplex serve`` as a real process: probes answer, first start prints secrets once."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from harness.cli import SECRET as GOOD_SECRET
from harness.cli import clean_env, loraplex_argv


@dataclass
class Served:
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@contextmanager
def serving(
    args: list[str], port: int, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[Served]:
    log = cwd / f"serve-{port}-{time.monotonic_ns()}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*loraplex_argv(), "serve", "--port", str(port), *args],
            cwd=cwd,
            env=clean_env(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    served = Served(f"http://127.0.0.1:{port}", log)
    try:
        wait_for(served, proc, "/health", 90)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"serve did not stop on SIGTERM:\n{served.output()}") from None
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert rc in (0, -signal.SIGTERM), f"serve exited {rc}:\n{served.output()}"
        assert "Application shutdown complete" in served.output(), served.output()


def wait_for(served: Served, proc: subprocess.Popen[bytes], path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}:\n{served.output()}")
        try:
            if httpx.get(served.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path} not 200 after {timeout}s:\n{served.output()}")


def wait_ready(served: Served, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(served.url + "/ready", timeout=5)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, (r.text, served.output())
    # the first start's secrets, then the ready line, come once /ready answers
    while "loraplex ready on " not in served.output() and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    assert f"loraplex ready on {served.url}" in served.output(), served.output()
    body: dict[str, object] = r.json()
    return body


def secret_after(output: str, label: str) -> str | None:
    for line in output.splitlines():
        if line.strip().startswith(label):
            return line.split(label, 1)[1].strip()
    return None


def get(served: Served, path: str, token: str) -> httpx.Response:
    return httpx.get(served.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_first_start_then_restart(tiny_llama_dir: Path, tmp_path: Path, free_port: int) -> None:
    args = ["--model", str(tiny_llama_dir), "--data-dir", str(tmp_path / "data")]
    with serving(args, free_port, tmp_path) as first:
        assert httpx.get(first.url + "/health").json() == {"status": "ok"}
        checks = wait_ready(first)["checks"]
        assert isinstance(checks, dict)
        assert {"database", "engine"} <= set(checks) and set(checks.values()) == {"ok"}
        out = first.output()
        key, token = secret_after(out, "API key:"), secret_after(out, "Admin token:")
        assert key is not None and key.startswith("lpx_"), out
        assert token is not None and token.startswith("lpxadm_"), out
        assert out.count(key) == 1 and out.count(token) == 1
        models = get(first, "/v1/models", key)
        assert models.status_code == 200, models.text
        assert get(first, "/v1/models", key + "x").status_code == 401
        assert get(first, "/admin/v1/tenants", token).status_code == 200
    assert (tmp_path / "data/loraplex.db").exists()
    assert key not in (tmp_path / "data/loraplex.db").read_bytes().decode("latin-1")

    with serving(args, free_port, tmp_path) as second:
        wait_ready(second)
        out = second.output()
        assert secret_after(out, "API key:") is None and secret_after(out, "Admin token:") is None
        assert "lpx_" not in out
        assert get(second, "/v1/models", key).status_code == 200
        assert get(second, "/admin/v1/tenants", token).status_code == 200


def test_production_mode_on_postgres(pg_url: str, tmp_path: Path, free_port: int) -> None:
    admin = "adm-" + "x" * 32
    env = {
        "LORAPLEX_DATABASE_URL": pg_url,
        "LORAPLEX_SECRET_KEY": GOOD_SECRET,
        "LORAPLEX_ADMIN_TOKEN": admin,
    }
    with serving(["--model", "dummy:tiny"], free_port, tmp_path, env) as served:
        wait_ready(served)
        out = served.output()
        key = secret_after(out, "API key:")
        assert key is not None, out
        assert secret_after(out, "Admin token:") is None  # configured, so none generated
        assert get(served, "/v1/models", key).status_code == 200
        assert get(served, "/admin/v1/tenants", admin).status_code == 200
    assert not (tmp_path / ".loraplex/loraplex.db").exists()  # the database is PostgreSQL


def http_get(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET on ``sock``: the whole response (its body is JSON, Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head


@pytest.mark.parametrize("model", ["dummy:tiny"])
def test_ready_reports_each_check(model: str, tmp_path: Path, free_port: int) -> None:
    """/ready says ok; an idle connection stays open for LORAPLEX_KEEP_ALIVE_S, then the
    server closes it."""
    args = ["--model", model, "--data-dir", str(tmp_path / "d")]
    with serving(args, free_port, tmp_path, {"LORAPLEX_KEEP_ALIVE_S": "2"}) as s:
        body = wait_ready(s)
        assert body["status"] == "ok"
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as sock:
            assert http_get(sock, "/health").startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle below the setting: the same connection serves again
            assert http_get(sock, "/health").startswith(b"HTTP/1.1 200")
            time.sleep(3.0)  # idle past it: closed by the server by now
            sock.settimeout(0.5)
            assert sock.recv(1) == b""


def run_serve(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*loraplex_argv(), "serve", *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_port_in_use_creates_nothing(tmp_path: Path, free_port: int) -> None:
    import socket

    data = tmp_path / "data"
    args = ["--model", "dummy:tiny", "--data-dir", str(data), "--port", str(free_port)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port))
        taken.listen()
        result = run_serve(args, tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().startswith("error: LORAPLEX_PORT: "), result.stderr
    assert "in use" in result.stderr and "Traceback" not in result.stderr
    assert "lpx_" not in result.stdout and not data.exists()
    # the next start, on a free port, is the first start: it prints the secrets
    with serving(args[:4], free_port, tmp_path) as served:
        wait_ready(served)
        assert secret_after(served.output(), "API key:") is not None, served.output()


@pytest.mark.parametrize("kind", ["architecture", "broken-gguf"])
def test_model_that_cannot_load(kind: str, tmp_path: Path, free_port: int) -> None:
    import json

    if kind == "architecture":  # a real config, of a model the engine does not implement
        model = tmp_path / "bert-model"
        model.mkdir()
        config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64,
                  "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
                  "vocab_size": 1000}  # fmt: skip
        (model / "config.json").write_text(json.dumps(config))
    else:
        model = tmp_path / "model.gguf"
        model.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    data = tmp_path / "data"
    args = ["--model", str(model), "--data-dir", str(data), "--port", str(free_port)]
    result = run_serve(args, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    assert errors[0].startswith(f"error: LORAPLEX_MODEL: cannot load {model}: "), out
    assert "Traceback" not in out and "lpx_" not in out, out
