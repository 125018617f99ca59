"""Engine clients over the toy runner for the client tests: in-process (a step thread) and
remote (``toy_server.py`` in a process of its own, over ZeroMQ), behind one helper."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toy_runner import ToyRunner

from loraplex.engine.client import EngineClient
from loraplex.engine.config import EngineConfig
from loraplex.engine.inproc_client import InprocEngineClient
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.remote_client import RemoteEngineClient

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).resolve().parent / "toy_server.py"


def ipc_address() -> str:
    """An ipc:// path short enough for a Unix socket (pytest's tmp paths can be long)."""
    return f"ipc://{tempfile.mkdtemp(prefix='lpx-', dir='/tmp')}/engine.sock"


class ToyServer:
    """``toy_server.py`` as a subprocess."""

    def __init__(self, address: str, tok_dir: Path, **opts: Any) -> None:
        self.address = address
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), address, str(tok_dir), json.dumps(opts)],
            cwd=ROOT,
            env=env,
        )

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Harness:
    kind: str
    client: EngineClient
    server: ToyServer | None = None
    runner: ToyRunner | None = None


async def wait_until(pred: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def toy_engine(kind: str, tok_dir: Path, **opts: Any) -> AsyncIterator[Harness]:
    """A started, ready engine client of ``kind`` ("inproc" or "remote") over the toy runner;
    ``opts`` as ``toy_server.py`` takes them."""
    server = None
    runner = None
    if kind == "inproc":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        slots = opts.get("slots", 2)
        runner = ToyRunner(tok, num_blocks=opts.get("num_blocks", 64), block_size=4,
                           num_slots=slots)  # fmt: skip
        run = runner.run
        delay = opts.get("step_delay_s", 0.0)

        def slow_or_failing(batch, prev_tokens=None):  # type: ignore[no-untyped-def]
            if opts.get("fail_execute"):
                raise RuntimeError("device lost")
            if delay:
                time.sleep(delay)
            return run(batch, prev_tokens)

        runner.run = slow_or_failing  # type: ignore[method-assign]
        config = EngineConfig(block_size=4, max_loras=slots, max_cpu_loras=max(slots, 4))
        client: EngineClient = InprocEngineClient(lambda: LLMEngine(runner, config), name="toy")
    else:
        server = ToyServer(ipc_address(), tok_dir, **opts)
        client = RemoteEngineClient(server.address, token=opts.get("client_token", ""))
    await client.start()
    harness = Harness(kind, client, server, runner)
    try:
        if opts.get("wait_ready", True):
            await wait_until(lambda: client.health().ready)
        yield harness
    finally:
        await client.close()
        if server is not None:
            server.stop()
