"""One timed run of the online serving benchmark against a server: the server's engine
counters before and after (``/metrics``), the batch size sampled while it runs, the
client's own CPU use, and the summary of the requests (``serving_metrics``)."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
from serving_client import Planned, closed_loop, poisson, send
from serving_metrics import RequestRecord, check_output, summarize

STEPS = "loraplex_engine_steps_total"
COUNTERS = {  # the engine's counters read before and after a run
    "steps": STEPS,
    "preemptions": "loraplex_engine_preemptions_total",
    "adapter_loads": "loraplex_engine_adapter_loads_total",
    "adapter_load_failures": "loraplex_engine_adapter_load_failures_total",
    "adapter_evictions": "loraplex_engine_adapter_evictions_total",
    "adapter_hits": "loraplex_engine_adapter_cache_hits_total",
    "adapter_misses": "loraplex_engine_adapter_cache_misses_total",
}
GAUGES = {"batch": "loraplex_engine_batch_size", "running": "loraplex_engine_requests_running"}
FAIR = "loraplex_engine_fair_"  # the engine's per-fairness-key families
# summed over the keys into "fair:<family>" by parse_metrics (queue_split's inputs)
FAIR_SUMS = (
    "scheduled",
    "queue_seconds",
    "queue_steps",
    "first_token_seconds",
    "first_token_steps",
    "first_tokens",
)


def server_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the serve process tree: the engine process and the gateway
    workers (everything but the engine) apart."""
    if pid is None:
        return {}
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return {}
    out = {"engine": 0.0, "gateway": 0.0}
    for p in procs:
        try:
            t = p.cpu_times()
            kind = "engine" if "engine" in " ".join(p.cmdline()) else "gateway"
        except psutil.Error:
            continue
        out[kind] += t.user + t.system
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page (the engine's are unlabelled), and
    the engine's per-key queue counters summed over the keys (``fair:<family>``)."""
    out: dict[str, float] = {}
    for (family, _key, _kind), value in parse_fair(text).items():
        if family in FAIR_SUMS:
            out["fair:" + family] = out.get("fair:" + family, 0.0) + value
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def parse_fair(text: str) -> dict[tuple[str, str, str], float]:
    """``(family, fairness_key, kind)`` -> value of each ``loraplex_engine_fair_*`` sample
    (``("steps", "", "")``: the engine's step count)."""
    out: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if line.startswith(STEPS + " "):
            out[("steps", "", "")] = float(line.split()[1])
            continue
        if not line.startswith(FAIR) or "{" not in line:
            continue
        name, _, rest = line.partition("{")
        labels, _, value = rest.rpartition("}")
        fields = dict(
            part.split("=", 1) for part in labels.split(",") if "=" in part
        )  # values are ids and kinds: no commas inside
        key = fields.get("fairness_key", "").strip('"')
        kind = fields.get("kind", "").strip('"')
        try:
            out[(name.removeprefix(FAIR).removesuffix("_total"), key, kind)] = float(value)
        except ValueError:
            continue
    return out


class Runner:
    def __init__(
        self, client: httpx.AsyncClient, url: str, args, pool=None, server_pid=None
    ) -> None:  # type: ignore[no-untyped-def]
        self.client, self.url, self.args = client, url, args
        self.pool = pool  # serving_client.ClientPool, or None: send from this process
        self.server_pid = server_pid  # loraplex serve's supervisor (--serve), for CPU use
        self._idle: dict[str, float] | None = None  # /metrics after the last run

    async def _send(self, p: Planned, t_run: float) -> RequestRecord:
        return await send(self.client, self.url, p, t_run)

    async def metrics(self) -> dict[str, float]:
        try:
            r = await self.client.get(self.url + "/metrics")
        except httpx.RemoteProtocolError:  # a pooled connection the server closed as it
            r = await self.client.get(self.url + "/metrics")  # went out: once more, anew
        r.raise_for_status()
        return parse_metrics(r.text)

    async def settled(self, poll_s: float = 0.6) -> dict[str, float]:
        """``/metrics`` once the engine's step count stops moving: the gateway's copy of
        the engine's stats comes with a heartbeat (every 0.5 s)."""
        last = await self.metrics()
        for _ in range(30):
            await asyncio.sleep(poll_s)
            cur = await self.metrics()
            if cur.get(STEPS) == last.get(STEPS):
                return cur
            last = cur
        return last

    async def warm_up(self, plan: list[Planned], timeout_s: float = 120.0) -> dict:
        """Each request until it succeeds (a worker may still be connecting to the engine:
        503), all at once. -> seconds and retries."""
        t0, retries, todo = time.perf_counter(), 0, plan
        while todo:
            records, _ = await closed_loop(todo, len(todo), self._send)
            failed = [p for p, r in zip(todo, records, strict=True) if r.error is not None]
            if failed and (
                time.perf_counter() - t0 > timeout_s
                or any(r.status not in (0, 503) for r in records if r.error is not None)
            ):
                errors = sorted({r.error or "" for r in records if r.error})
                raise RuntimeError(f"warm-up failed: {errors}")
            retries += len(failed)
            todo = failed
            if todo:
                await asyncio.sleep(1.0)
        return {"requests": len(plan), "retries": retries, "seconds": time.perf_counter() - t0}

    async def closed(self, plan: list[Planned], concurrency: int) -> dict:
        row = await self._timed(self._pool_or_here(plan, concurrency=concurrency))
        return {"mode": "closed", "concurrency": concurrency, "rate": None, **row}

    async def poisson(self, plan: list[Planned], rate: float, seed: int) -> dict:
        row = await self._timed(self._pool_or_here(plan, rate=rate, seed=seed))
        return {"mode": "poisson", "concurrency": None, "rate": rate, **row}

    async def _pool_or_here(self, plan: list[Planned], **load):  # type: ignore[no-untyped-def]
        """-> (records, seconds, client CPU seconds): from the client processes, or from
        this process's own event loop with ``--client-procs 0``."""
        if self.pool is not None:
            return await self.pool.run(self.url, self.args.request_timeout, plan, **load)
        cpu0 = time.process_time()
        if load.get("concurrency"):
            records, seconds = await closed_loop(plan, load["concurrency"], self._send)
        else:
            records, seconds = await poisson(plan, load["rate"], load["seed"], self._send)
        return records, seconds, time.process_time() - cpu0

    async def _timed(self, run) -> dict:
        a = self.args
        before = self._idle or await self.settled()
        samples: list[dict[str, float]] = []
        sampler = asyncio.create_task(self._sample(samples)) if a.metrics_interval > 0 else None
        cpu_before = server_cpu(self.server_pid)
        try:
            records, duration, cpu = await run
        finally:
            if sampler is not None:
                sampler.cancel()
        after = self._idle = await self.settled()
        for r in records:
            check_output(r, a.output_len)
        row = summarize(records, duration, a.slo_ttft_ms / 1e3, a.slo_tpot_ms / 1e3)
        eng = {k: after.get(m, math.nan) - before.get(m, math.nan) for k, m in COUNTERS.items()}
        steps = eng["steps"]
        eng["ms_per_step"] = duration * 1e3 / steps if steps > 0 else math.nan
        eng["tokens_per_step"] = row["output_tokens"] / steps if steps > 0 else math.nan
        busy = [s for s in samples if s.get("batch", 0) > 0]
        eng["batch_sampled"] = sum(s["batch"] for s in busy) / len(busy) if busy else math.nan
        eng["running_sampled"] = (
            sum(s.get("running", 0) for s in busy) / len(busy) if busy else math.nan
        )
        eng["samples"] = len(samples)
        eng.update(queue_split({k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}))
        row["engine"] = eng
        row["client_cpu"] = cpu / duration if duration > 0 else math.nan  # cores, all procs
        cpu_after = server_cpu(self.server_pid)
        row["server_cpu"] = {  # cores used, by the server's processes, over the run
            k: (cpu_after[k] - cpu_before.get(k, 0.0)) / duration for k in cpu_after if duration > 0
        }
        row["records"] = [r.compact() for r in records]
        print(
            f"  {len(records)} requests in {duration:.1f}s, {row['out_tok_s']:.0f} out tok/s, "
            f"errors {row['errors'] or 'none'}",
            flush=True,
        )
        return row

    async def _sample(self, into: list[dict[str, float]]) -> None:
        while True:
            await asyncio.sleep(self.args.metrics_interval)
            try:
                m = await self.metrics()
            except httpx.HTTPError:
                continue
            into.append({k: m[name] for k, name in GAUGES.items() if name in m})


def queue_split(d: dict[str, float]) -> dict[str, float]:
    """From the engine's per-key counters over a run (``fair:<family>`` deltas): where its
    share of the TTFT goes, in the mean over the run's requests. Queue: from arrival in the
    engine to being scheduled (in ms and in steps); first token: from arrival in the engine
    to its first token (likewise)."""
    n, firsts = d.get("fair:scheduled", 0.0), d.get("fair:first_tokens", 0.0)
    return {
        "queue_ms_mean": d.get("fair:queue_seconds", 0.0) * 1e3 / n if n else math.nan,
        "queue_steps_mean": d.get("fair:queue_steps", 0.0) / n if n else math.nan,
        "first_token_ms_mean": (
            d.get("fair:first_token_seconds", 0.0) * 1e3 / firsts if firsts else math.nan
        ),
        "first_token_steps_mean": (
            d.get("fair:first_token_steps", 0.0) / firsts if firsts else math.nan
        ),
    }
