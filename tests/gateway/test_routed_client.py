"""The replica router (``gateway.routed_client``) over two real engine servers
(``loraplex engine``, ``dummy:tiny`` on the CPU), found through a DNS-style source: each
adapter's requests land on one replica; a replica that stops answering has its not yet
started requests served by the other; a stream it had started ends with ``EngineDead``."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness.replicas import EngineReplica, engine_replicas, tiny_adapters

from loraplex.engine.api import AdapterRef, Request, RequestOutput, SamplingParams
from loraplex.engine.errors import EngineDead
from loraplex.engine.remote_client import RemoteEngineClient
from loraplex.gateway.engine_discovery import dns_source, system_resolve
from loraplex.gateway.routed_client import RoutedEngineClient


async def wait_for(pred, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def request(adapter: AdapterRef | None, max_tokens: int = 4) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    return Request(f"r-{uuid.uuid4().hex}", [5, 6, 7, 8], sampling, adapter)


async def run(router: RoutedEngineClient, req: Request) -> list[RequestOutput]:
    return [out async for out in router.generate(req)]


def sample(router: RoutedEngineClient, name: str) -> float:
    for line in router.metrics.text().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def router_over(replicas: list[EngineReplica], **kw: float) -> RoutedEngineClient:
    ips = [r.ip for r in replicas]
    source = dns_source(f"engine.test:{replicas[0].port}", resolve=lambda host: ips)
    router = RoutedEngineClient(
        source, lambda url: RemoteEngineClient(url, heartbeat_s=0.25, timeout_s=4.0), **kw
    )
    await router.start()
    return router


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[list[EngineReplica], RoutedEngineClient]]:
    with engine_replicas(2, tmp_path / "logs") as replicas:
        router = await router_over(replicas, eject_s=30.0)
        try:
            await wait_for(lambda: all(r.client.health().ready for r in router._replicas.values()))
            yield replicas, router
        finally:
            await router.close()


def test_system_resolver_reads_localhost() -> None:
    assert "127.0.0.1" in system_resolve("localhost")


@pytest.mark.timeout(180)
async def test_affinity_bound_retry_and_started_stream(
    two: tuple[list[EngineReplica], RoutedEngineClient], tmp_path: Path
) -> None:
    replicas, router = two
    assert sorted(router._replicas) == sorted(r.url for r in replicas)
    refs = [AdapterRef(f"k{i}", str(p)) for i, p in enumerate(tiny_adapters(tmp_path, 8))]
    # Affinity: each adapter, asked for again and again one at a time, stays on one replica.
    where: dict[str, set[str]] = {}
    for _ in range(3):
        for ref in refs:
            replica, _ = router.pick(ref.key)
            where.setdefault(ref.key, set()).add(replica.url)
            outs = await run(router, request(ref))
            assert outs[-1].finished and outs[-1].error is None
    assert all(len(urls) == 1 for urls in where.values()), where
    assert len({u for urls in where.values() for u in urls}) == 2  # both replicas serve
    await wait_for(lambda: all(
        set(r.client.stats().gpu_adapters) >= {k for k, u in where.items() if r.url in u}
        for r in router._replicas.values()))  # fmt: skip
    a, b = (set(r.client.stats().gpu_adapters) for r in router._replicas.values())
    assert not a & b  # each adapter was loaded on one replica only
    assert router.pick(refs[0].key)[1].outcome == "resident"

    # Bounded load: one hot adapter, many at once, spills to the other replica.
    hot = refs[0]
    results = await asyncio.gather(*(run(router, request(hot, 24)) for _ in range(12)))
    assert all(r[-1].error is None for r in results)
    assert sample(router, 'loraplex_route_decisions_total{outcome="spill"}') > 0
    served = {r.url: r.client.stats().adapter_hits + r.client.stats().adapter_misses
              for r in router._replicas.values()}  # fmt: skip
    assert all(n > 0 for n in served.values()), served

    # A replica that stops answering (SIGSTOP): requests sent to it, with no output yet,
    # are served by the other once its client gives up on it; it is then ejected.
    home = next(r for r in replicas if r.url == router.pick(refs[1].key)[0].url)
    other = next(r for r in replicas if r is not home)
    stream = router.generate(request(refs[1], 400))
    first = await anext(stream)  # a started stream on `home`
    assert first.completion_tokens > 0
    home.signal(signal.SIGSTOP)
    late = [asyncio.create_task(run(router, request(ref))) for ref in refs
            if router.pick(ref.key)[0].url == home.url]  # fmt: skip
    assert late
    for outs in await asyncio.gather(*late):  # retried on `other`: no request lost
        assert outs[-1].finished and outs[-1].error is None
    with pytest.raises(EngineDead):  # the started one is not retried: it ends with an error
        async for _ in stream:
            pass
    assert router.pick(refs[1].key)[0].url == other.url  # ejected: not routed to
    assert sample(router, "loraplex_route_retries_total") >= 1
    home.signal(signal.SIGKILL)


@pytest.mark.timeout(180)
async def test_draining_replica_finishes_its_stream_and_gets_no_new_work(
    tmp_path: Path,
) -> None:
    """An engine replaced under load (SIGTERM, LORAPLEX_ENGINE_DRAIN_GRACE_S): its stream
    runs to the end, and the requests of the adapters it was home to go to the other."""
    env = {"LORAPLEX_ENGINE_DRAIN_GRACE_S": "60"}
    with engine_replicas(2, tmp_path / "logs", env) as replicas:
        router = await router_over(replicas, eject_s=30.0)
        try:
            await wait_for(lambda: all(r.client.health().ready for r in router._replicas.values()))
            refs = [AdapterRef(f"k{i}", str(p)) for i, p in enumerate(tiny_adapters(tmp_path, 6))]
            # the replica to replace: one that is home to some of them (hashing may give
            # all six to one replica: 2 runs in 64)
            homes = [router.pick(ref.key)[0].url for ref in refs]
            going, staying = (
                (replicas[0], replicas[1])
                if replicas[0].url in homes
                else (replicas[1], replicas[0])
            )
            homed = [ref for ref, home in zip(refs, homes, strict=True) if home == going.url]
            assert homed
            stream = router.generate(request(homed[0], 400))
            outs = [await anext(stream)]
            going.signal(signal.SIGTERM)
            await wait_for(lambda: router._replicas[going.url].client.health().state == "draining")
            states = {r.url: r.state for r in router.replicas()}  # the console's engines page
            assert states == {going.url: "draining", staying.url: "ready"}
            for ref in homed:  # served by the other replica, none refused
                assert router.pick(ref.key)[0].url != going.url
                done = await run(router, request(ref))
                assert done[-1].finished and done[-1].error is None
            outs += [out async for out in stream]
            assert outs[-1].error is None and outs[-1].completion_tokens == 400
            assert await asyncio.to_thread(going.proc.wait, 30) == 0
        finally:
            await router.close()
