"""The long-running processes freeze their startup heap (``loraplex.heap``): the engine
server's step loop once its engine is ready, a gateway worker once its lifespan has built
the app. Each case runs in a process of its own, as those do (freezing is per process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness.cli import SECRET

ROOT = Path(__file__).resolve().parents[1]

STEP_LOOP = """
import gc, sys, threading
sys.path.insert(0, {engine_tests!r})
from toy_runner import ToyRunner
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer
from loraplex.engine.step_loop import StepLoop

loop = StepLoop(
    lambda: LLMEngine(ToyRunner(dummy_tokenizer(512)), EngineConfig(block_size=4)),
    lambda outputs: None,
    freeze={freeze},
)
loop.start()
assert loop.wait_ready(60) and loop.failure is None, loop.failure
print(gc.get_freeze_count())
loop.shutdown()
"""

GATEWAY = """
import asyncio, gc
from pathlib import Path
from loraplex.gateway.app import create_app
from loraplex.gateway.settings import GatewaySettings

async def main() -> None:
    settings = GatewaySettings(
        database_url={db!r}, secret_key={secret!r}, data_dir=Path({data!r}),
    )
    app = create_app(settings, freeze_heap={freeze})
    async with app.router.lifespan_context(app):
        print(gc.get_freeze_count())

asyncio.run(main())
"""


def frozen(script: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("freeze", [True, False])
def test_step_loop_freezes_when_asked(freeze: bool) -> None:
    count = frozen(STEP_LOOP.format(engine_tests=str(ROOT / "tests" / "engine"), freeze=freeze))
    assert (count > 10_000) if freeze else count == 0  # modules, torch, the engine


@pytest.mark.parametrize("freeze", [True, False])
def test_gateway_lifespan_freezes_when_asked(freeze: bool, tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    script = GATEWAY.format(db=db, secret=SECRET, data=str(tmp_path), freeze=freeze)
    count = frozen(script)
    assert (count > 10_000) if freeze else count == 0
