"""``loraplex engine --http``: a real engine process (``dummy:tiny``), scraped and driven the
way a vLLM-aware router and an operator would: vLLM's metric names and label sets, the
probes, and vLLM's ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``, where unload
really frees the adapter's GPU slot."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from harness.replicas import engine_replicas, tiny_adapters
from prometheus_client.parser import text_string_to_metric_families

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.errors import EngineDead
from loraplex.engine.remote_client import RemoteEngineClient

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(http: httpx.AsyncClient) -> Samples:
    r = await http.get("/metrics")
    assert r.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def loaded(samples: Samples) -> set[tuple[str, str, str]]:
    return {(lb["adapter_name"], lb["level"], lb["pinned"])
            for lb, _ in samples.get("vllm:lora_adapter_loaded", [])}  # fmt: skip


async def until(pred, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def wait_until(pred, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_vllm_metrics_probes_and_lora_routes(tmp_path: Path) -> None:
    (path,) = tiny_adapters(tmp_path / "adapters", 1)
    with engine_replicas(1, tmp_path / "logs", http=True) as (engine,):
        url = f"http://127.0.0.1:{engine.http_port}"
        async with httpx.AsyncClient(base_url=url) as http:
            await drive(http, engine.url, path)


async def drive(http: httpx.AsyncClient, engine_url: str, path: Path) -> None:
    async def has(adapter: tuple[str, str, str]) -> bool:
        return adapter in loaded(await scrape(http))

    async def idle() -> bool:
        return (await scrape(http))["vllm:num_requests_running"][0][1] == 0.0

    async def ready() -> bool:
        try:
            return (await http.get("/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    await until(ready)
    assert (await http.get("/health")).status_code == 200
    m = await scrape(http)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):  # fmt: skip
        ((labels, value),) = m[name]
        assert set(labels) == {"model_name", "engine"} and labels["model_name"] == "dummy:tiny"
        assert value == 0.0
    ((info, stamp),) = m["vllm:lora_requests_info"]
    assert set(info) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert int(info["max_lora"]) >= 1 and info["running_lora_adapters"] == ""
    assert abs(stamp - time.time()) < 60  # the value is the snapshot's time
    assert m["vllm:num_gpu_loaded_lora_adapters"] == [({}, 0.0)]
    assert loaded(m) == set()

    body = {"lora_name": "k1", "lora_path": str(path)}
    r = await http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200, r.text
    assert loaded(await scrape(http)) == {("k1", "cpu", "false")}
    again = await http.post("/v1/load_lora_adapter", json=body)
    assert again.status_code == 400 and again.json()["object"] == "error"
    bad = await http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert bad.status_code == 400

    client = RemoteEngineClient(engine_url)
    await client.start()
    try:
        await wait_until(lambda: client.health().ready)
        sampling = SamplingParams(max_tokens=2040, min_tokens=2040, ignore_eos=True)
        stream = client.generate(Request("long", [5, 6, 7], sampling, AdapterRef("k1", str(path))))
        await anext(stream)  # running with the adapter: in a GPU slot, pinned
        await until(lambda: has(("k1", "gpu", "true")), 10)
        m = await scrape(http)
        assert m["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == "k1"
        assert m["vllm:num_requests_running"][0][1] == 1.0
        busy = await http.post("/v1/unload_lora_adapter", json={"lora_name": "k1"})
        assert busy.status_code == 409  # in use: refused
        await stream.aclose()  # aborts it
        await until(idle)
        assert ("k1", "gpu", "false") in loaded(await scrape(http))
    finally:
        await client.close()

    r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "k1"})
    assert r.status_code == 200, r.text
    m = await scrape(http)
    assert loaded(m) == set()  # the GPU slot and host memory freed
    assert m["vllm:num_gpu_loaded_lora_adapters"] == [({}, 0.0)]
    assert m["vllm:num_cpu_loaded_lora_adapters"] == [({}, 0.0)]
    gone = await http.post("/v1/unload_lora_adapter", json={"lora_name": "k1"})
    assert gone.status_code == 404


@pytest.mark.timeout(240)
async def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    """LORAPLEX_ENGINE_DRAIN_GRACE_S: SIGTERM makes the engine say ``draining`` (not ready:
    a router sends new requests elsewhere) while the request it runs finishes whole."""
    env = {"LORAPLEX_ENGINE_DRAIN_GRACE_S": "60"}
    with engine_replicas(1, tmp_path / "logs", env, http=True) as (engine,):
        client = RemoteEngineClient(engine.url)
        await client.start()
        try:
            await wait_until(lambda: client.health().ready)
            sampling = SamplingParams(max_tokens=600, min_tokens=600, ignore_eos=True)
            stream = client.generate(Request("long", [5, 6, 7], sampling))
            outs = [await anext(stream)]
            engine.signal(signal.SIGTERM)
            await wait_until(lambda: client.health().state == "draining", 30)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}") as h:
                assert (await h.get("/ready")).status_code == 503
            with pytest.raises(EngineDead):  # new work is not taken
                client.generate(Request("late", [5], SamplingParams(max_tokens=1)))
            outs += [out async for out in stream]
            assert outs[-1].finished and outs[-1].error is None
            assert outs[-1].completion_tokens == 600
            assert await asyncio.to_thread(engine.proc.wait, 30) == 0
        finally:
            await client.close()


@pytest.mark.timeout(120)
async def test_gateways_hear_of_a_drain_when_it_begins(tmp_path: Path) -> None:
    """The engine tells every gateway it drains when SIGTERM comes, not at the gateway's next
    heartbeat: here no heartbeat falls inside the drain (they are 30 s apart once the client
    is ready), and the gateway still sees ``draining`` before ``dead``."""
    env = {"LORAPLEX_ENGINE_DRAIN_GRACE_S": "60"}
    with engine_replicas(1, tmp_path / "logs", env, http=True) as (engine,):
        client = RemoteEngineClient(engine.url)
        seen: list[str] = []
        record = client._set_health

        def recording(health):  # type: ignore[no-untyped-def]
            seen.append(health.state)
            record(health)

        client._set_health = recording  # type: ignore[method-assign]
        await client.start()
        try:
            await wait_until(lambda: client.health().ready, 60)
            client._heartbeat_s = 30.0  # after the ping of the sleep in progress, none
            await asyncio.sleep(1.0)
            sampling = SamplingParams(max_tokens=100, min_tokens=100, ignore_eos=True)
            stream = client.generate(Request("short", [5, 6, 7], sampling))
            outs = [await anext(stream)]
            engine.signal(signal.SIGTERM)
            outs += [out async for out in stream]
            assert outs[-1].finished and outs[-1].error is None
            assert await asyncio.to_thread(engine.proc.wait, 30) == 0
            await wait_until(lambda: client.health().state in ("dead", "unreachable"), 30)
            assert "draining" in seen, seen
            assert seen.index("draining") < len(seen) - 1
        finally:
            await client.close()
