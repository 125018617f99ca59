"""The gateway side runs where torch is not installed: a gateway worker process whose
import path holds every installed package but torch (and what needs it: triton, peft...),
serving the official ``openai`` client in front of an engine server in another process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))
from engine_clients import ToyServer, ipc_address  # noqa: E402

# torch and the packages that import it at import time
WITHOUT = ("torch", "triton", "nvidia", "torchgen", "functorch", "peft", "accelerate")


def site_without_torch(dest: Path) -> Path:
    """A directory of links to every installed package except ``WITHOUT`` (and this
    project's own editable install: the repository root goes on the path instead)."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(WITHOUT) or name.startswith(("__editable__", "loraplex")):
            continue
        if entry.suffix == ".pth":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


BOOT = textwrap.dedent(
    """
    import importlib.util, json, os, signal, sys
    sys.path[:0] = [{site!r}, {root!r}]
    assert importlib.util.find_spec("torch") is None, "torch is importable"

    def report(*_):  # uvicorn re-raises the SIGTERM it caught: we get it after shutdown
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {without!r})
        open({report!r}, "w").write(json.dumps(loaded))
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    import uvicorn
    from loraplex.gateway.worker import create_worker_app
    uvicorn.run(create_worker_app(), host="127.0.0.1", port={port}, log_level="warning")
    """
)


@pytest.mark.timeout(240)
def test_gateway_serves_in_an_environment_without_torch(tmp_path: Path, free_port: int) -> None:
    from tiny_tokenizer import build_tokenizer

    tok_dir = tmp_path / "tok"
    build_tokenizer(tok_dir)
    engine = ToyServer(ipc_address(), tok_dir)
    site = site_without_torch(tmp_path / "site")
    report = tmp_path / "modules.json"
    admin = secrets.token_hex(16)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "PYTHON"))},
        "LORAPLEX_ENGINE_URL": engine.address,
        "LORAPLEX_DATA_DIR": str(tmp_path / "data"),
        "LORAPLEX_ADMIN_TOKEN": admin,
    }
    subprocess.run(
        [sys.executable, "-m", "loraplex.main", "migrate"], env=env, cwd=ROOT, check=True
    )
    boot = BOOT.format(site=str(site), root=str(ROOT), port=free_port, report=str(report),
                       without=WITHOUT)  # fmt: skip
    gateway = subprocess.Popen([sys.executable, "-I", "-S", "-c", boot], env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert gateway.poll() is None, "the gateway exited"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=url, headers=headers) as c:
            assert c.post("/admin/v1/tenants", json={"name": "notorch"}).status_code == 201
            key = c.post("/admin/v1/tenants/notorch/keys", json={"scopes": ["inference"]})
            assert key.status_code == 201, key.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key.json()["key"], max_retries=0)
        assert [m.id for m in client.models.list()] == ["toy"]  # the engine's own name
        reply = client.completions.create(model="toy", prompt="The quick", max_tokens=5)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        chunks = list(
            client.completions.create(model="toy", prompt="Paged", max_tokens=3, stream=True)
        )
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        gateway.terminate()
        gateway.wait(30)
        engine.stop()
    assert report.read_text() == "[]"  # no torch (nor anything needing it) was loaded
