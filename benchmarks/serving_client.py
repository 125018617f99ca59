"""The load generator of the online serving benchmark: streamed OpenAI requests over httpx,
timed per chunk, sent in a closed loop (a fixed number of streams) or at Poisson arrivals.

Each request is planned up front (:class:`Planned`: its tenant's key, its ``model``, its
body); sending one gives a :class:`~serving_metrics.RequestRecord`. Server-sent events are
split by hand (``data: ...`` lines) and each one is timed when its bytes arrive.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from serving_metrics import RequestRecord


@dataclass(frozen=True)
class Planned:
    index: int
    tenant: int
    adapter: int | None  # None: the base model
    key: str  # the tenant's API key
    path: str  # /v1/completions or /v1/chat/completions
    body: dict


def completion_body(model: str, prompt: list[int], output_len: int) -> dict:
    """A streamed text completion of exactly ``output_len`` tokens (greedy) over token ids."""
    return {
        "model": model,
        "prompt": prompt,
        **_exact(output_len),
    }


def chat_body(model: str, text: str, output_len: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        **_exact(output_len),
    }


def _exact(output_len: int) -> dict:
    return {
        "max_tokens": output_len,
        "min_tokens": output_len,  # vLLM's names: no stop before output_len tokens
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def make_client(timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,
    )


async def send(client: httpx.AsyncClient, url: str, p: Planned, t_run: float) -> RequestRecord:
    """One streamed request. Never raises: a failure is the record's ``error``."""
    rec = RequestRecord(p.index, p.tenant, p.adapter)
    t0 = time.perf_counter()
    rec.start = t0 - t_run
    headers = {"Authorization": f"Bearer {p.key}"}
    try:
        async with client.stream("POST", url + p.path, json=p.body, headers=headers) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                body = await resp.aread()
                rec.error = f"http_{resp.status_code}"
                rec.detail = body[:300].decode(errors="replace")
                return rec
            buf = b""
            async for data in resp.aiter_bytes():
                now = time.perf_counter() - t0
                buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    _on_event(rec, event, now)
            rec.e2e = time.perf_counter() - t0
    except (httpx.HTTPError, OSError, ValueError) as exc:  # ValueError: a bad event
        rec.error = f"exception_{type(exc).__name__}"
        rec.detail = str(exc)[:300]
    return rec


def _on_event(rec: RequestRecord, event: bytes, now: float) -> None:
    if not event.startswith(b"data: ") or rec.error is not None:
        return
    payload = event[6:]
    if payload == b"[DONE]":
        return
    obj = json.loads(payload)
    if rec.response_id is None:
        rec.response_id = obj.get("id")
    if "error" in obj:
        rec.error = "stream_error"
        rec.detail = str(obj["error"].get("message", ""))[:300]
        return
    if obj.get("choices"):
        choice = obj["choices"][0]
        reason = choice.get("finish_reason")
        text = choice.get("text") or (choice.get("delta") or {}).get("content")
        if text or reason is not None:  # not chat's opening role chunk
            if rec.ttft is None:
                rec.ttft = now
            rec.chunk_times.append(now)
        if reason is not None:
            rec.finish_reason = reason
    usage = obj.get("usage")
    if usage:
        rec.output_tokens = usage["completion_tokens"]
        rec.prompt_tokens = usage["prompt_tokens"]


Sender = Callable[[Planned, float], Awaitable[RequestRecord]]


async def closed_loop(plan: list[Planned], concurrency: int, sender: Sender):
    """``concurrency`` streams, each sending its next request when its last one ends.
    -> (records in plan order, seconds from the first send to the last end)."""
    records: list[RequestRecord | None] = [None] * len(plan)
    todo = iter(range(len(plan)))
    t_run = time.perf_counter()

    async def stream() -> None:
        for i in todo:
            records[i] = await sender(plan[i], t_run)

    await asyncio.gather(*(stream() for _ in range(min(concurrency, len(plan)))))
    return _done(records, t_run)


async def poisson(plan: list[Planned], rate: float, seed: int, sender: Sender):
    """Requests sent at Poisson arrivals of ``rate`` per second (exponential gaps from
    ``seed``), however many are in flight. -> (records, seconds to the last end)."""
    gen = random.Random(seed)
    records: list[RequestRecord | None] = [None] * len(plan)
    t_run = time.perf_counter()
    at, tasks = 0.0, []

    async def one(i: int) -> None:
        records[i] = await sender(plan[i], t_run)

    for i in range(len(plan)):
        delay = t_run + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        at += gen.expovariate(rate)
    await asyncio.gather(*tasks)
    return _done(records, t_run)


def _done(records: list[RequestRecord | None], t_run: float):
    """-> (the records, seconds from the first send to now, when the last has ended)."""
    end = time.perf_counter() - t_run
    got = [r for r in records if r is not None]
    if len(got) != len(records) or not got:
        raise RuntimeError("a planned request was never sent")
    return got, end - min(r.start for r in got)


# ---- sending from several processes -----------------------------------------------------
# One Python process parsing every stream's events saturates a core long before the server
# does (256 streams at ~70 tokens/s each is ~18,000 events/s): the client would measure itself.
# Each run is split over client processes; perf_counter is CLOCK_MONOTONIC on Linux, shared
# by every process, so all records count from one start.


def _proc_run(url: str, timeout_s: float, jobs: list[tuple[Planned, float]], streams: int,
              t_run: float) -> tuple[list[RequestRecord], float]:  # fmt: skip
    """In a client process: ``jobs`` as (request, send offset) pairs; ``streams`` > 0 sends
    them in a closed loop of that many streams (offsets unused). -> (records, CPU seconds)."""
    cpu0 = time.process_time()

    async def main() -> list[RequestRecord]:
        async with make_client(timeout_s) as client:
            out: list[RequestRecord] = []

            async def one(p: Planned, at: float) -> None:
                delay = t_run + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                out.append(await send(client, url, p, t_run))

            if streams > 0:
                todo = iter(jobs)

                async def stream() -> None:
                    for p, _ in todo:
                        await one(p, 0.0)

                await asyncio.gather(*(stream() for _ in range(min(streams, len(jobs)))))
            else:
                await asyncio.gather(*(one(p, at) for p, at in jobs))
            return out

    records = asyncio.run(main())
    return records, time.process_time() - cpu0


class ClientPool:
    """``procs`` client processes, started once and reused by every run."""

    def __init__(self, procs: int) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp

        self.procs = max(1, procs)
        self._pool = cf.ProcessPoolExecutor(self.procs, mp_context=mp.get_context("spawn"))
        list(self._pool.map(time.sleep, [0.0] * self.procs))  # start them now

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, url: str, timeout_s: float, plan: list[Planned], *,
                  concurrency: int = 0, rate: float = 0.0, seed: int = 0,
                  procs: int = 0):  # fmt: skip
        """A closed loop of ``concurrency`` streams, or Poisson arrivals at ``rate``, over
        all the processes (``procs`` > 0: that many, so that runs can go side by side). ->
        (records in plan order, seconds from the first send to the last end, client CPU
        seconds over all processes)."""
        n = min(self.procs, procs) if procs > 0 else self.procs
        if concurrency > 0:
            n = min(n, concurrency)
            offsets = [0.0] * len(plan)
        else:
            gen, at, offsets = random.Random(seed), 0.0, []
            for _ in plan:
                offsets.append(at)
                at += gen.expovariate(rate)
        shares = [[(p, offsets[i]) for i, p in enumerate(plan) if i % n == k] for k in range(n)]
        streams = [concurrency // n + (1 if k < concurrency % n else 0) for k in range(n)]
        t_run = time.perf_counter() + 0.2  # every process's clock starts here
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(self._pool, _proc_run, url, timeout_s, share, streams[k], t_run)
            for k, share in enumerate(shares)
            if share
        ]
        done = await asyncio.gather(*futures)
        records = sorted((r for recs, _ in done for r in recs), key=lambda r: r.index)
        cpu = sum(c for _, c in done)
        got, seconds = _done(list(records), t_run)
        return got, seconds, cpu
