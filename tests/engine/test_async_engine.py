"""AsyncEngine over the paged toy runner: streaming, abort, errors, death, stats."""

from __future__ import annotations

import asyncio
import time

import pytest
from toy_runner import ToyRunner, reference_greedy, write_toy_adapter

from engine.api import AdapterRef, Request, RequestOutput, SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import EngineDead, InvalidRequest, PromptTooLong
from engine.llm_engine import LLMEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("asynctok"))


@pytest.fixture
def aengine(tok):
    runner = ToyRunner(tok, num_blocks=64, block_size=4, num_slots=2)
    engine = AsyncEngine(
        lambda: LLMEngine(runner, EngineConfig(block_size=4, max_loras=2, max_cpu_loras=4))
    )
    engine.start()
    assert engine.wait_ready(10)
    yield engine
    engine.shutdown()
    inner = engine.engine
    assert inner is not None
    assert inner.blocks.is_whole() and inner.slots.is_idle() and inner.num_requests() == 0


async def collect(engine: AsyncEngine, req: Request) -> list[RequestOutput]:
    return [o async for o in engine.generate(req)]


def toks(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for d in o.deltas for t in d.token_ids]


async def wait_for(pred):
    deadline = time.monotonic() + 5.0
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_concurrent_streams_match_reference(aengine, tok, tmp_path):
    refs = [
        AdapterRef(f"k{i}", fetch=(lambda p=write_toy_adapter(tmp_path / f"a{i}", 20 + i): p))
        for i in range(3)
    ]
    reqs = [
        Request(
            f"r{i}",
            [3 + i, 4, 5, 6 + i],
            SamplingParams(max_tokens=6, **GREEDY),
            refs[i % 3] if i % 4 else None,
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*(collect(aengine, r) for r in reqs))
    for req, outs in zip(reqs, results, strict=True):
        w = 0 if req.adapter is None else 20 + int(req.adapter.key[1:])
        assert toks(outs) == reference_greedy(req.prompt, w, 6, len(tok))
        assert outs[-1].finished and [o.finished for o in outs].count(True) == 1
    await wait_for(lambda: aengine.stats().steps > 0 and aengine.stats().num_requests == 0)
    s = aengine.stats()
    assert s.adapter_loads == 3 and s.adapter_evictions >= 1 and s.kv_blocks_total == 64


async def test_request_errors_are_raised_from_generate(aengine):
    with pytest.raises(PromptTooLong):
        await collect(aengine, Request("long", list(range(3, 300)), SamplingParams(max_tokens=4)))
    with pytest.raises(InvalidRequest):
        await collect(aengine, Request("bad", [3, 4], SamplingParams(top_p=0.0)))
    outs = await collect(aengine, Request("fine", [3, 4], SamplingParams(max_tokens=2, **GREEDY)))
    assert outs[-1].finished


async def test_abort_ends_the_stream(aengine):
    outs = []
    async for o in aengine.generate(
        Request("long", [3, 4, 5], SamplingParams(max_tokens=200, **GREEDY))
    ):
        outs.append(o)
        if len(outs) == 3:
            aengine.abort("long")
    assert outs[-1].finished and outs[-1].deltas[-1].finish_reason == "abort"
    assert len(toks(outs)) < 200


async def test_leaving_the_stream_aborts(aengine):
    agen = aengine.generate(Request("gone", [3, 4, 5], SamplingParams(max_tokens=200, **GREEDY)))
    async for _ in agen:
        break
    await agen.aclose()
    await wait_for(lambda: aengine.stats().steps > 0 and aengine.stats().num_requests == 0)
    assert aengine.stats().kv_blocks_used == 0


async def test_shutdown_ends_streams_with_abort(tok):
    engine = AsyncEngine(
        LLMEngine(ToyRunner(tok), EngineConfig(block_size=4, max_loras=2, max_cpu_loras=2))
    )
    engine.start()
    outs = []
    async for o in engine.generate(Request("s", [3, 4], SamplingParams(max_tokens=200, **GREEDY))):
        outs.append(o)
        if len(outs) == 2:
            await asyncio.to_thread(engine.shutdown)
    assert outs[-1].finished and outs[-1].deltas[-1].finish_reason == "abort"
    inner = engine.engine
    assert inner is not None and inner.blocks.is_whole() and inner.num_requests() == 0
    with pytest.raises(EngineDead):
        await collect(engine, Request("late", [3], SamplingParams()))


async def test_failed_adapter_errors_its_stream_only(aengine, tmp_path):
    bad = AdapterRef("bad", fetch=lambda: tmp_path / "missing")
    bad_outs, good_outs = await asyncio.gather(
        collect(aengine, Request("b", [3, 4], SamplingParams(max_tokens=3), bad)),
        collect(aengine, Request("g", [3, 4], SamplingParams(max_tokens=3, **GREEDY))),
    )
    assert bad_outs[-1].deltas[-1].finish_reason == "error" and "bad" in (bad_outs[-1].error or "")
    assert good_outs[-1].deltas[-1].finish_reason == "length"


async def test_dead_step_loop_fails_everything(tok):
    runner = ToyRunner(tok, num_blocks=16, block_size=4)

    def boom(batch):
        raise RuntimeError("device lost")

    runner.execute = boom  # type: ignore[method-assign]
    engine = AsyncEngine(
        LLMEngine(runner, EngineConfig(block_size=4, max_loras=2, max_cpu_loras=2))
    )
    engine.start()
    assert engine.wait_ready(5)
    with pytest.raises(EngineDead):
        await collect(engine, Request("x", [3, 4], SamplingParams(max_tokens=2)))
    assert not engine.is_ready and not engine.is_alive
    with pytest.raises(EngineDead):
        await collect(engine, Request("y", [3, 4], SamplingParams(max_tokens=2)))
    engine.shutdown()


async def test_not_started_is_not_ready(tok):
    engine = AsyncEngine(
        LLMEngine(ToyRunner(tok), EngineConfig(block_size=4, max_loras=2, max_cpu_loras=2))
    )
    assert not engine.is_ready
    with pytest.raises(EngineDead):
        await collect(engine, Request("x", [3], SamplingParams()))


async def test_failed_build_is_reported(tok):
    def factory() -> LLMEngine:
        raise FileNotFoundError("no model at /nowhere")

    engine = AsyncEngine(factory)
    engine.start()
    assert not engine.wait_ready(5)
    assert isinstance(engine.failure, FileNotFoundError) and engine.engine is None
    with pytest.raises(EngineDead, match="no model"):
        await collect(engine, Request("x", [3], SamplingParams()))
    engine.shutdown()
