"""An :class:`EngineClient` over several engine replicas, one remote client each.

The rest of the gateway sees one engine. Each request goes where ``gateway.routing``
says (adapter affinity with bounded load) from a view built of plain values: the
requests this process has in flight per replica and the adapter keys each replica
reported in GPU slots (in its stats, piggybacked on the heartbeat's answers; no extra
calls). A replica is routable while its client is ready and it is not ejected; a replica
that failed a request (``EngineDead``) is ejected for ``eject_s``.

A request that fails before its first output (the replica died, was unreachable, or
refused it as overloaded) is tried on another replica, each at most once; once an output
has been yielded the stream is the caller's, and a replica that dies then ends it with
``EngineDead`` (the gateway sends an error event and meters it once, as with one engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from loraplex.engine.api import AdapterRef, AdapterResidency, Request, RequestOutput
from loraplex.engine.client import EngineClient, EngineHealth, ModelInfo
from loraplex.engine.errors import EngineDead, EngineError, EngineOverloaded
from loraplex.engine.stats import EngineStats
from loraplex.gateway.engine_discovery import Source
from loraplex.gateway.routing import Choice, ReplicaView, choose, load_bound
from loraplex.gateway.routing_metrics import RouteMetrics, merge_stats

log = logging.getLogger("loraplex.gateway.router")

MakeClient = Callable[[str], EngineClient]


@dataclass
class Replica:
    url: str
    client: EngineClient
    inflight: int = 0
    ejected_until: float = 0.0
    removed: bool = False  # gone from discovery: closed once its last request ends
    requests: set[str] = field(default_factory=set)

    def routable(self, now: float) -> bool:
        return not self.removed and now >= self.ejected_until and self.client.health().ready

    def view(self) -> ReplicaView:
        stats = self.client.stats()
        gpu = frozenset(stats.gpu_adapters) if stats is not None else frozenset()
        return ReplicaView(self.url, self.inflight, gpu)


@dataclass(frozen=True)
class ReplicaStatus:
    url: str
    state: str  # the replica client's health state
    detail: str
    inflight: int  # this gateway process's requests on it
    out_of_rotation: bool  # ejected after a failure, or gone from discovery


class RoutedEngineClient:
    def __init__(
        self,
        source: Source,
        make_client: MakeClient,
        *,
        load_factor: float = 1.25,
        load_floor: int = 1,
        eject_s: float = 5.0,
        refresh_s: float = 5.0,
    ) -> None:
        self._source = source
        self._make_client = make_client
        self._load_factor = load_factor
        self._load_floor = load_floor
        self._eject_s = eject_s
        self._refresh_s = refresh_s
        self._replicas: dict[str, Replica] = {}
        self._owner: dict[str, Replica] = {}  # request id -> the replica running it
        self._task: asyncio.Task[None] | None = None
        self.metrics = RouteMetrics(lambda: list(self._replicas.values()))

    # -- replicas ----------------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # a first lookup that fails is retried
            await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="engine-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in list(self._replicas.values()):
            await replica.client.close()
        self._replicas.clear()

    async def refresh(self) -> None:
        """Connect to replicas that appeared; retire the ones that went."""
        urls = await self._source()
        for url in urls:
            current = self._replicas.get(url)
            if current is None or current.removed:
                if current is not None:
                    await current.client.close()
                replica = Replica(url, self._make_client(url))
                self._replicas[url] = replica
                await replica.client.start()
                log.info("engine replica %s added", url)
        for url, replica in list(self._replicas.items()):
            if url not in urls and not replica.removed:
                replica.removed = True
                log.info("engine replica %s removed", url)
            if replica.removed and replica.inflight == 0:
                del self._replicas[url]
                await replica.client.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # DNS down: keep the replicas we have
                log.warning("engine discovery failed: %s", exc)

    def _routable(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self._replicas.values() if r.routable(now)]

    def _eject(self, replica: Replica) -> None:
        replica.ejected_until = time.monotonic() + self._eject_s
        self.metrics.ejected(replica.url)

    def pick(
        self, adapter: str | None, exclude: set[str] | frozenset[str] = frozenset()
    ) -> tuple[Replica, Choice]:
        """The replica for a request with ``adapter`` (raises EngineDead when none is up)."""
        candidates = [r for r in self._routable() if r.url not in exclude]
        views = [r.view() for r in candidates]
        choice = choose(adapter, views, self._load_factor, self._load_floor)
        if choice is None:
            raise EngineDead("no engine replica is ready")
        replica = self._replicas[choice.name]
        bound = load_bound(views, self._load_factor, self._load_floor)
        self.metrics.load_ratio((replica.inflight + 1) / bound)
        return replica, choice

    def replicas(self) -> list[ReplicaStatus]:
        """Each known replica's health, for the console's engines page."""
        now = time.monotonic()
        out = []
        for r in self._replicas.values():
            h = r.client.health()
            out.append(
                ReplicaStatus(
                    r.url, h.state, h.detail, r.inflight, r.removed or now < r.ejected_until
                )
            )
        return out

    # -- the protocol ------------------------------------------------------------------------

    def health(self) -> EngineHealth:
        states = [r.client.health() for r in self._replicas.values() if not r.removed]
        if any(h.ready for h in states):
            return EngineHealth("ready")
        if any(h.state == "starting" for h in states):
            return EngineHealth("starting", "the engine replicas are starting")
        detail = "; ".join(h.detail for h in states if h.detail) or "no engine replica found"
        return EngineHealth("unreachable", f"no engine replica is ready ({detail})")

    def _ready_client(self) -> EngineClient | None:
        return next((r.client for r in self._replicas.values() if r.client.health().ready), None)

    def model_info(self) -> ModelInfo | None:
        client = self._ready_client()
        return None if client is None else client.model_info()

    def tokenizer(self) -> Any:
        client = self._ready_client()
        return None if client is None else client.tokenizer()

    def stats(self) -> EngineStats | None:
        """The replicas' counters summed (adapter lists joined)."""
        return merge_stats([s for r in self._replicas.values() if (s := r.client.stats())])

    def metrics_text(self) -> bytes:
        """The router's own metrics; each engine's own are scraped at its HTTP surface."""
        return self.metrics.text()

    def generate(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        return self._generate(request)

    async def _generate(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        key = request.adapter.key if request.adapter is not None else None
        tried: set[str] = set()
        last_error: EngineError | None = None
        while True:
            try:
                replica, choice = self.pick(key, tried)
            except EngineDead:
                raise last_error or EngineDead("no engine replica is ready") from None
            tried.add(replica.url)
            if last_error is not None:
                self.metrics.retried()
            self.metrics.routed(choice)
            outputs: AsyncGenerator[RequestOutput, None] | None = None
            replica.inflight += 1
            replica.requests.add(request.request_id)
            self._owner[request.request_id] = replica
            try:
                try:
                    outputs = replica.client.generate(request)
                    first = await anext(outputs)
                except EngineDead as exc:  # nothing produced: another replica may serve it
                    self._eject(replica)
                    last_error = exc
                    continue
                if _overloaded(first):
                    last_error = first.exception
                    continue
                yield first
                if first.finished:
                    return
                try:
                    async for out in outputs:
                        yield out
                except EngineDead:
                    self._eject(replica)
                    raise
                return
            finally:
                replica.inflight -= 1
                replica.requests.discard(request.request_id)
                if self._owner.get(request.request_id) is replica:
                    del self._owner[request.request_id]
                if outputs is not None:
                    await outputs.aclose()

    async def abort(self, request_id: str) -> None:
        replica = self._owner.get(request_id)
        if replica is not None:
            await replica.client.abort(request_id)

    async def adapter_residency(self) -> AdapterResidency:
        """Every ready replica's residency joined (a key held by two is listed once)."""
        gpu: dict[str, None] = {}
        host: dict[str, None] = {}
        loading: dict[str, None] = {}
        for replica in self._routable():
            res = await replica.client.adapter_residency()
            gpu.update(dict.fromkeys(res.gpu))
            host.update(dict.fromkeys(res.host))
            loading.update(dict.fromkeys(res.loading))
        return AdapterResidency(list(gpu), list(host), list(loading))

    async def load_adapter(self, ref: AdapterRef) -> bool:
        """Load on the replica its requests would go to."""
        replica, _ = self.pick(ref.key)
        return await replica.client.load_adapter(ref)

    async def unload_adapter(self, key: str) -> bool:
        """Unload from every ready replica; True when any held it."""
        freed = False
        for replica in self._routable():
            freed = await replica.client.unload_adapter(key) or freed
        return freed


def _overloaded(out: RequestOutput) -> bool:
    return (
        out.finished and out.completion_tokens == 0 and isinstance(out.exception, EngineOverloaded)
    )
