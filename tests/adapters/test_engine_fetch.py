"""The engine side's fetcher: registry -> S3 (moto) -> disk cache -> engine.

The object store goes down: adapters in the engine's memory keep serving, and so does one
evicted from it but still in the disk cache; cold ones fail fast; all recover when it returns.
(200 adapters through 8 slots, via HTTP, is in test_rest_e2e.py.)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from adapter_files import TINY, write_lora
from hf_reference import HfReference
from moto_proc import MotoServer
from prometheus_client import CollectorRegistry

from loraplex.adapters.cache import DiskCache
from loraplex.adapters.fetcher import Fetcher
from loraplex.adapters.guarded_store import GuardedStore
from loraplex.adapters.metrics import AdapterMetrics
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.storage import S3Store
from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import EngineError
from loraplex.engine.inproc_client import InprocEngineClient
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.lora.loader import local_fetch
from loraplex.tenancy.breaker import CircuitBreaker

PROMPT = [1, 40, 41, 42, 43, 44, 45]
MAX_TOKENS = 4
TARGETS = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj"), ("k_proj", "up_proj")]


@pytest.fixture(scope="module")
def hf(tiny_llama_dir: Path) -> HfReference:
    return HfReference(tiny_llama_dir)


async def generate(
    engine: InprocEngineClient, adapter: AdapterRef | None
) -> tuple[list[int], str | None]:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    request = Request(f"r-{uuid.uuid4().hex[:8]}", PROMPT, sampling, adapter)
    tokens: list[int] = []
    error = None
    try:
        async for out in engine.generate(request):
            for d in out.deltas:
                tokens.extend(d.token_ids)
            error = out.error or error
    except EngineError as exc:  # failed before any token
        error = exc.message
    return tokens, error


class World:
    def __init__(self, sessions, moto: MotoServer, bucket: str, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
        s3 = S3Store(bucket, "lpx", endpoint_url=moto.url, connect_timeout=0.5, read_timeout=2.0)
        self.store = GuardedStore(s3, CircuitBreaker("object_store", failure_threshold=1,
                                                     open_s=0.5))  # fmt: skip
        self.registry = AdapterRegistry(sessions, self.store, lambda: TINY, max_rank=8)
        self.metrics = AdapterMetrics(CollectorRegistry())
        self.cache = DiskCache(cache_dir, 1 << 30, self.metrics)
        self.fetcher = Fetcher(self.store, self.cache, self.metrics, backoff_initial_s=0.5,
                               backoff_max_s=2.0)  # fmt: skip

    async def ref(self, tenant_id: uuid.UUID, model: str) -> AdapterRef:
        version = await self.registry.resolve(tenant_id, model)
        assert version is not None, model
        return AdapterRef.in_store(version.sha256, version.storage_key)

    def fetch(self, ref: AdapterRef) -> Path | tuple[Path, str]:
        """The engine side's fetch, as ``loraplex.engine_wiring.store_fetch`` builds it."""
        key = ref.storage_key
        return local_fetch(ref) if key is None else self.fetcher.fetch_with_tier(ref.key, key)


async def start_engine(model: Path, w: World) -> InprocEngineClient:
    config = EngineConfig(
        max_loras=8, max_cpu_loras=8, max_lora_rank=8, device="cpu", dtype="float32",
        max_num_seqs=16, kv_cache_bytes=8 << 20,
    )  # fmt: skip
    eng = InprocEngineClient(lambda: LLMEngine.from_model(model, config, fetch=w.fetch))
    await eng.start()
    assert await asyncio.to_thread(eng.wait_ready, 120)
    return eng


@pytest.fixture
async def world(sessions, moto: MotoServer, bucket: str, tmp_path: Path) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    yield World(sessions, moto, bucket, tmp_path / "cache")


def make_adapter(root: Path, i: int) -> Path:
    return write_lora(
        root / f"a{i}", TINY, rank=1 + i % 4, targets=TARGETS[i % len(TARGETS)], seed=1000 + i,
        scale=0.4,
    )  # fmt: skip


async def test_store_down_cached_serve_cold_fail_then_recover(
    tiny_llama_dir: Path,
    hf: HfReference,
    sessions,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    moto = MotoServer()  # this test's own server: stopping it disturbs no other test
    moto.start()
    engine = None
    try:
        bucket = f"down-{uuid.uuid4().hex[:8]}"
        moto.client().create_bucket(Bucket=bucket)
        w = World(sessions, moto, bucket, tmp_path / "cache")
        engine = await start_engine(tiny_llama_dir, w)
        from loraplex.tenancy.models import Tenant

        async with sessions() as s, s.begin():
            tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
            s.add(tenant)
        warm_src, cold_src = make_adapter(tmp_path, 501), make_adapter(tmp_path, 502)
        await w.registry.publish(tenant.id, "warm", warm_src)
        await w.registry.publish(tenant.id, "cold", cold_src)
        warm_tokens, err = await generate(engine, await w.ref(tenant.id, "warm"))
        assert err is None and warm_tokens == hf.greedy(warm_src, PROMPT, MAX_TOKENS)
        snapshot = moto.snapshot(bucket)

        moto.stop()  # the object store is down
        cold_ref = await w.ref(tenant.id, "cold")  # the database still answers
        for _ in range(3):
            tokens, err = await generate(engine, await w.ref(tenant.id, "warm"))
            assert err is None and tokens == warm_tokens  # served from host memory / disk
        # evict "warm" from the engine's memory tiers; the disk cache still holds it
        for i in range(10):
            filler = make_adapter(tmp_path / "fill", 600 + i)
            await generate(engine, AdapterRef(f"filler-{i}", str(filler)))
        tokens, err = await generate(engine, await w.ref(tenant.id, "warm"))
        assert err is None and tokens == warm_tokens
        started = time.monotonic()
        for _ in range(5):  # cold: fails fast while the store's breaker is open
            tokens, err = await generate(engine, cold_ref)
            assert err is not None and "object store unavailable" in err
        assert time.monotonic() - started < 10

        moto.start()  # the store comes back (moto is in memory: put back what S3 would hold)
        moto.restore(bucket, snapshot)
        deadline = time.monotonic() + 10
        while True:
            tokens, err = await generate(engine, cold_ref)
            if err is None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert err is None and tokens == hf.greedy(cold_src, PROMPT, MAX_TOKENS)
        # loads by the tier they came from: "warm" and "cold" downloaded once each; the
        # fillers (local directories) and "warm" again (from the disk cache) from disk
        deadline = time.monotonic() + 5
        while True:
            stats = engine.stats()
            tiers = {} if stats is None else stats.adapter_loads_by_tier
            counts = {t: v.count for t, v in tiers.items()}
            if counts == {"object_store": 2, "disk": 11} or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert counts == {"object_store": 2, "disk": 11}
        assert tiers["object_store"].fetch_seconds > 0 and tiers["disk"].bytes > 0
    finally:
        if engine is not None:
            await engine.close()
        moto.stop()
