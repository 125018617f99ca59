"""Issue #21 with real timings: the fairness scenario of the online serving benchmark
(``bench_serving.py --fairness``), against a running server, over its tenants.

Tenant 0 floods, tenant 1 is light, tenants 2 and 3 share the server with weights 3:1.
Runs, one after the other:

- ``light_alone``: tenant 1's requests at Poisson ``--fair-light-rate``, nothing else.
- ``light_flood``: tenant 0 in a closed loop of ``--fair-flood-streams`` streams (more than
  the engine's ``max_num_seqs``, so a queue forms); once it has run ``--fair-settle-s``,
  tenant 1's requests as in ``light_alone``. Both tenants have their own fairness key.
- ``light_flood_fifo``: the same, but the light requests are the flood tenant's own (its
  key and adapters, at the light schedule): one fairness key, so they queue first come,
  first served behind the flood (what a light tenant gets without fair scheduling).
- ``one_key``: tenant 2 alone in a closed loop of ``2 * --fair-pair-streams`` streams, over
  its adapters.
- ``two_keys``: tenant 2 (``scheduling_weight`` 3) and tenant 3 (weight 1), each its own
  closed loop of ``--fair-pair-streams`` streams, both backlogged: service shares over a
  window while both are, and total throughput against ``one_key`` (the cost of fairness).
  Each over half its tenant's adapters: the batch holds as many distinct adapters as in
  ``one_key`` (``adapters`` in each run's result), so the cost is the scheduling's alone.
  The ``2 * --fair-pair-requests`` requests of ``one_key`` split 3:1 as the weights do, so
  that both loops end about together.
- ``--fair-cost-repeats`` R > 1: R - 1 more pairs of the last two, their order alternated;
  the cost's median over the R pairs (single pairs spread by a few %).
  The pairs' requests take mixed output lengths (``--fair-pair-output-spread``), the same
  draw in every run (:meth:`FairnessScenario.pair_lengths`).

The cost of fairness is reported twice: over the whole runs, and over the steady window
(``--fair-window-at-s`` / ``--fair-window-s``, decode tokens from the engine's per-key
counters) in which every loop is still backlogged. Until 12-05 the two loops had as many
requests each: tenant 2's weight ended its loop first, and the last third of the two-key run
was tenant 3 alone with ``--fair-pair-streams`` (= ``max_num_seqs``) streams, no queue, a
seat empty for each request's round trip, which the one-key run (twice the streams) never
has; the whole runs' cost counted that tail. Split 3:1, the loops run out together and the
whole runs compare the same load but for the last requests' drain.

The light runs' TTFT is split with the usage ledger's own ``ttft_ms`` afterwards
(``bench_serving.ledger_split``: the gateway's engine call to its first token, and the rest).
Per key, from the engine's ``/metrics`` (``loraplex_engine_fair_*{fairness_key}``, deltas):
queue seconds and scheduler steps per scheduled sequence (1 step: scheduled at the first
step after it arrived), service tokens (prefill, decode), preemptions.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import httpx
from common import write_json
from serving_client import Planned, completion_body, poisson
from serving_metrics import check_output, summarize
from serving_offline import prompt_set
from serving_runs import FAIR_SUMS, parse_fair, queue_split, server_cpu

WEIGHTS = (3, 1)  # tenants 2 and 3's scheduling_weight (the two-key run)


def per_key(before: dict, after: dict, key: str) -> dict[str, float]:
    def d(family: str, kind: str = "") -> float:
        return after.get((family, key, kind), 0.0) - before.get((family, key, kind), 0.0)

    split = queue_split({"fair:" + family: d(family) for family in FAIR_SUMS})
    return {
        "scheduled": d("scheduled"),
        "queue_ms_mean": split["queue_ms_mean"],
        "queue_steps_mean": split["queue_steps_mean"],
        "prefill_tokens": d("service_tokens", "prefill"),
        "decode_tokens": d("service_tokens", "decode"),
        "preemptions": d("preemptions"),
        "engine_first_token_ms_mean": split["first_token_ms_mean"],
        "engine_first_token_steps_mean": split["first_token_steps_mean"],
    }


class FairnessScenario:
    def __init__(self, args, runner, tenancy, vocab: int, url: str, admin_token: str) -> None:  # type: ignore[no-untyped-def]
        self.args, self.runner, self.tenancy, self.vocab = args, runner, tenancy, vocab
        self.url, self.admin = url, {"Authorization": f"Bearer {admin_token}"}
        self.ids: list[str] = []
        self.salt = 50_000

    # ---- setup ---------------------------------------------------------------------------
    async def setup(self) -> None:
        if len(self.tenancy.tenants) < 4 or len(self.tenancy.adapters) < 4:
            raise SystemExit("--fairness needs --tenants >= 4 and --adapters >= 4")
        async with httpx.AsyncClient(base_url=self.url, headers=self.admin, trust_env=False) as h:
            for name in self.tenancy.tenants:
                r = await h.get(f"/admin/v1/tenants/{name}")
                r.raise_for_status()
                self.ids.append(str(r.json()["id"]))
            for name, w in zip(self.tenancy.tenants[2:4], WEIGHTS, strict=True):
                r = await h.patch(
                    f"/admin/v1/tenants/{name}", json={"limits": {"scheduling_weight": w}}
                )
                r.raise_for_status()

    def plan(
        self, tenant: int, n: int, adapters: int | None = None, lengths: list[int] | None = None
    ) -> list[Planned]:
        """``n`` requests of tenant ``tenant``'s adapters (its first ``adapters`` of them)
        in turn, fresh prompts, with its key; ``lengths``: each request's output tokens
        (default ``--output-len`` each)."""
        t = self.tenancy
        mine = self.adapters_of(tenant)
        mine = mine[: max(1, adapters)] if adapters is not None else mine
        self.salt += 1
        ids = prompt_set(self.args, self.vocab, n, self.salt)
        key = t.keys[tenant]
        out = []
        for i, prompt in enumerate(ids):
            adapter = mine[i % len(mine)]
            n_out = lengths[i] if lengths is not None else self.args.output_len
            body = completion_body(t.adapters[adapter], prompt, n_out)
            out.append(Planned(i, tenant, adapter, key, "/v1/completions", body))
        return out

    def pair_lengths(self, n: int) -> list[int]:
        """The output lengths of a cost pair's ``n`` requests: uniform over ``--output-len``
        +- ``--fair-pair-output-spread`` of it, the same draw for every run. Closed loops of
        one fixed length run in waves (their requests end in the same step and the next
        start together), and a window of a few seconds then sees a different phase in each
        run (H100: window costs from -8 % to +9 % in one run); mixed lengths spread the
        loops' ends over the steps."""
        a = self.args
        rng, lo = random.Random(a.seed), a.output_len * (1 - a.fair_pair_output_spread)
        hi = a.output_len * (1 + a.fair_pair_output_spread)
        return [max(1, round(rng.uniform(lo, hi))) for _ in range(n)]

    def adapters_of(self, tenant: int) -> list[int]:
        """Tenant ``tenant``'s adapters (indices into ``tenancy.adapters``)."""
        t = self.tenancy
        return [j for j in range(len(t.adapters)) if j % len(t.tenants) == tenant]

    async def fair_metrics(self) -> dict:
        r = await self.runner.client.get(self.url + "/metrics")
        r.raise_for_status()
        return parse_fair(r.text)

    async def settled(self) -> dict:
        await self.runner.settled()
        return await self.fair_metrics()

    # ---- runs ----------------------------------------------------------------------------
    async def light(self, fifo: bool = False):  # type: ignore[no-untyped-def]
        """The light requests: tenant 1's, or (``fifo``) as many more of the flood tenant's,
        sent at the same times: one key with the flood, served first come, first served."""
        a = self.args
        plan = self.plan(0 if fifo else 1, a.fair_light_requests)
        return await poisson(plan, a.fair_light_rate, a.seed, self.runner._send)

    async def closed(self, plan: list[Planned], streams: int, procs: int):  # type: ignore[no-untyped-def]
        return await self.runner.pool.run(
            self.url, self.args.request_timeout, plan, concurrency=streams, procs=procs
        )

    def summary(self, records, seconds: float, lengths: list[int] | None = None) -> dict:  # type: ignore[no-untyped-def]
        a = self.args
        for r in records:
            check_output(r, lengths[r.index] if lengths is not None else a.output_len)
        row = summarize(records, seconds, a.slo_ttft_ms / 1e3, a.slo_tpot_ms / 1e3)
        out = {k: row[k] for k in ("completed", "errors", "out_tok_s", "req_s", "ttft_ms")} | {
            "tpot_ms": row["tpot_ms"],
            "error_samples": row["error_samples"],
        }
        if len(records) <= a.fair_light_requests:  # the light runs: kept for the ledger split
            out["records"] = [r.compact() for r in records]
        return out

    async def run_light_alone(self) -> dict:
        before = await self.settled()
        records, seconds = await self.light()
        after = await self.settled()
        return {"light": self.summary(records, seconds), "keys": self.keys(before, after, [1])}

    async def run_light_flood(self, fifo: bool) -> dict:
        a = self.args
        before = await self.settled()
        flood = asyncio.create_task(
            self.closed(self.plan(0, a.fair_flood_requests), a.fair_flood_streams, a.fair_procs)
        )
        await asyncio.sleep(a.fair_settle_s)
        if flood.done():
            raise SystemExit(
                "the flood ended before the light requests: raise --fair-flood-requests"
            )
        m0, cpu0 = await self.fair_metrics(), server_cpu(self.runner.server_pid)
        records, seconds = await self.light(fifo)
        m1, cpu1 = await self.fair_metrics(), server_cpu(self.runner.server_pid)
        flood_still_on = not flood.done()
        f_records, f_seconds, _ = await flood
        after = await self.settled()
        steps = m1.get(("steps", "", ""), 0.0) - m0.get(("steps", "", ""), 0.0)
        return {
            "light": self.summary(records, seconds),
            # the engine's mean step over the light requests' span (the flood's steps)
            "step_ms_mean": seconds * 1e3 / steps if steps else float("nan"),
            "server_cores": {k: (cpu1[k] - cpu0.get(k, 0.0)) / seconds for k in cpu1},
            "flood": self.summary(f_records, f_seconds),
            "flood_outlasted_light": flood_still_on,
            "keys": self.keys(before, after, [0] if fifo else [0, 1]),
        }

    async def window(self, runs: list[asyncio.Task]) -> tuple[dict, float, bool]:
        """The engine's per-key counters over ``--fair-window-s`` from ``--fair-window-at-s``
        after ``runs`` started -> (before, after, seconds between the two reads, whether
        every run was still going at the end)."""
        a = self.args
        await asyncio.sleep(a.fair_window_at_s)
        w0, t0 = await self.fair_metrics(), time.perf_counter()
        await asyncio.sleep(a.fair_window_s)
        w1, t1 = await self.fair_metrics(), time.perf_counter()
        return (w0, w1), t1 - t0, not any(r.done() for r in runs)

    async def run_one_key(self) -> dict:
        a = self.args
        before = await self.settled()
        lengths = self.pair_lengths(2 * a.fair_pair_requests)
        plan = self.plan(2, 2 * a.fair_pair_requests, lengths=lengths)
        run = asyncio.create_task(self.closed(plan, 2 * a.fair_pair_streams, 2 * a.fair_procs))
        (w0, w1), span, on = await self.window([run])
        records, seconds, _ = await run
        after = await self.settled()
        k2 = self.keys(w0, w1, [2])[self.ids[2]]
        return {
            "all": self.summary(records, seconds, lengths),
            "output_len_range": [min(lengths), max(lengths)],
            "adapters": len({p.adapter for p in plan}),
            "window_decode_tok_s": k2["decode_tokens"] / span,
            "window_backlogged": on,
            "keys": self.keys(before, after, [2]),
        }

    async def run_two_keys(self) -> dict:
        a = self.args
        before = await self.settled()
        # each key half its tenant's adapters: as many distinct adapters in the batch as
        # run_one_key's (tenant 2's all), so the cost compares the scheduling alone
        half = len(self.adapters_of(2)) // 2
        # the one-key run's requests and lengths, split as the weights
        drawn = self.pair_lengths(2 * a.fair_pair_requests)
        n2 = len(drawn) * WEIGHTS[0] // sum(WEIGHTS)
        lengths = [drawn[:n2], drawn[n2:]]
        plans = [self.plan(t, len(lengths[i]), half, lengths[i]) for i, t in enumerate((2, 3))]
        t0 = time.perf_counter()
        runs = [
            asyncio.create_task(self.closed(plan, a.fair_pair_streams, a.fair_procs))
            for plan in plans
        ]
        (w0, w1), span, both_on = await self.window(runs)
        (r2, s2, _), (r3, s3, _) = await asyncio.gather(*runs)
        seconds = time.perf_counter() - t0
        after = await self.settled()
        window = self.keys(w0, w1, [2, 3])
        k2, k3 = window[self.ids[2]], window[self.ids[3]]
        out_tokens = sum(r.output_tokens for r in r2 + r3 if r.error is None)
        return {
            "weights": {"tenant2": WEIGHTS[0], "tenant3": WEIGHTS[1]},
            "adapters": len({p.adapter for plan in plans for p in plan}),
            "tenant2": self.summary(r2, s2, lengths[0]),
            "tenant3": self.summary(r3, s3, lengths[1]),
            "out_tok_s": out_tokens / seconds,
            "window_decode_tok_s": (k2["decode_tokens"] + k3["decode_tokens"]) / span,
            "window": window,
            "window_both_backlogged": both_on,
            "decode_share_ratio": k2["decode_tokens"] / k3["decode_tokens"]
            if k3["decode_tokens"]
            else float("nan"),
            "service_ratio": (k2["prefill_tokens"] + 2 * k2["decode_tokens"])
            / (k3["prefill_tokens"] + 2 * k3["decode_tokens"])
            if k3["decode_tokens"]
            else float("nan"),
            "keys": self.keys(before, after, [2, 3]),
        }

    def keys(self, before: dict, after: dict, tenants: list[int]) -> dict:
        return {self.ids[t]: per_key(before, after, self.ids[t]) for t in tenants}

    async def run_all(self, result: dict) -> None:
        await self.setup()
        out = result.setdefault("fairness", {})
        steps = [
            ("light_alone", self.run_light_alone),
            ("light_flood", lambda: self.run_light_flood(fifo=False)),
            ("light_flood_fifo", lambda: self.run_light_flood(fifo=True)),
            ("one_key", self.run_one_key),
            ("two_keys", self.run_two_keys),
        ]
        for name, run in steps:
            print(f"fairness: {name}", flush=True)
            out[name] = await run()
            print(f"  {brief(name, out[name], self.ids)}", flush=True)
            write_json(self.args.json, result)  # what a run cut short by a time limit keeps
        pairs = [cost_pair(out["one_key"], out["two_keys"])]
        for i in range(1, self.args.fair_cost_repeats):  # more pairs, the order alternated
            got = {}
            for name in ("two_keys", "one_key") if i % 2 else ("one_key", "two_keys"):
                got[name] = await (
                    self.run_two_keys() if name == "two_keys" else self.run_one_key()
                )
            pairs.append(cost_pair(got["one_key"], got["two_keys"]))
            out["cost_pairs"] = pairs
            write_json(self.args.json, result)
            print(
                f"fairness: cost pair {i + 1}: whole runs {pairs[-1]['cost']:.4f}, "
                f"steady window {pairs[-1]['window_cost']:.4f}"
            )
        out["cost_pairs"] = pairs
        out["derived"] = derived(out, self.ids)
        print(f"fairness: {out['derived']}", flush=True)


def cost_pair(one: dict, two: dict) -> dict:
    """The cost of fairness from a one-key run and a two-key run: over the whole runs, and
    over the steady window (both keys backlogged throughout: the load the same in both runs;
    the whole two-key run ends with tenant 3 alone, whose ``--fair-pair-streams`` streams
    leave the batch's seats empty for each request's round trip)."""
    failed = {
        k: run["errors"]
        for k, run in (("one key", one["all"]), *((t, two[t]) for t in ("tenant2", "tenant3")))
        if run["errors"]
    }
    if failed:  # a run that lost requests did less work: its throughput is no cost
        raise RuntimeError(f"fairness cost pair: requests failed, no cost taken: {failed}")
    a, b = one["all"]["out_tok_s"], two["out_tok_s"]
    wa, wb = one["window_decode_tok_s"], two["window_decode_tok_s"]
    return {
        "one_key": a,
        "two_keys": b,
        "cost": 1 - b / a,
        "one_key_window": wa,
        "two_keys_window": wb,
        "window_cost": 1 - wb / wa if wa else float("nan"),
        "windows_backlogged": bool(one["window_backlogged"] and two["window_both_backlogged"]),
    }


def brief(name: str, run: dict, ids: list[str]) -> str:
    if "light" in run:
        t = run["light"]["ttft_ms"]
        q = run["keys"].get(ids[1], run["keys"].get(ids[0], {}))
        span = (  # the light runs beside the flood: its steps and the server's cores
            f"engine step mean {run['step_ms_mean']:.1f} ms, server cores "
            + ", ".join(f"{k} {v:.2f}" for k, v in run["server_cores"].items())
            + ", "
            if "step_ms_mean" in run
            else ""
        )
        return (
            f"light TTFT p50 {t['p50']:.1f} p99 {t['p99']:.1f} ms, "
            f"queue mean {q.get('queue_ms_mean', float('nan')):.1f} ms "
            f"({q.get('queue_steps_mean', float('nan')):.2f} steps), "
            f"engine first token mean {q.get('engine_first_token_ms_mean', float('nan')):.1f} ms "
            f"({q.get('engine_first_token_steps_mean', float('nan')):.2f} steps), "
            f"{span}errors {run['light']['errors'] or 'none'}"
        )
    if name == "one_key":
        return (
            f"{run['all']['out_tok_s']:.0f} out tok/s over {run['adapters']} adapters "
            f"(steady window {run['window_decode_tok_s']:.0f} decode tok/s, backlogged "
            f"{run['window_backlogged']}), errors {run['all']['errors'] or 'none'}"
        )
    return (
        f"{run['out_tok_s']:.0f} out tok/s over {run['adapters']} adapters "
        f"(steady window {run['window_decode_tok_s']:.0f} decode tok/s), "
        f"decode share 3:1 -> {run['decode_share_ratio']:.2f}, "
        f"weighted service -> {run['service_ratio']:.2f}, "
        f"both backlogged over the window: {run['window_both_backlogged']}"
    )


def derived(out: dict, ids: list[str]) -> dict:
    alone, flood, fifo = out["light_alone"], out["light_flood"], out["light_flood_fifo"]
    q_alone = alone["keys"][ids[1]]["queue_ms_mean"]
    q_flood = flood["keys"][ids[1]]["queue_ms_mean"]
    return {
        "light_ttft_p50_ratio": flood["light"]["ttft_ms"]["p50"] / alone["light"]["ttft_ms"]["p50"],
        "light_ttft_p99_ratio": flood["light"]["ttft_ms"]["p99"] / alone["light"]["ttft_ms"]["p99"],
        "light_ttft_p50_fifo_ms": fifo["light"]["ttft_ms"]["p50"],
        "light_queue_ms": {"alone": q_alone, "flood": q_flood},
        "light_queue_steps": {
            run: out[f"light_{run}"]["keys"][ids[1]]["queue_steps_mean"]
            for run in ("alone", "flood")
        },
        # arrival in the engine to first token in the engine's steps: beside the flood as
        # many as alone when the light request is scheduled at once (its milliseconds are
        # the flood's steps, longer than an idle engine's)
        "light_first_token_steps": {
            run: out[f"light_{run}"]["keys"][ids[1]]["engine_first_token_steps_mean"]
            for run in ("alone", "flood")
        },
        "share_ratio_3_to_1": out["two_keys"]["decode_share_ratio"],
        "share_error": abs(out["two_keys"]["decode_share_ratio"] * WEIGHTS[1] / WEIGHTS[0] - 1),
        "fairness_throughput_cost": 1.0
        - out["two_keys"]["out_tok_s"] / out["one_key"]["all"]["out_tok_s"],
        # over every pair (--fair-cost-repeats): single runs spread by a few %
        "fairness_throughput_cost_median": statistics.median(c["cost"] for c in out["cost_pairs"]),
        # the same load in both runs (cost_pair): the scheduling's own cost
        "fairness_window_cost_median": statistics.median(
            c["window_cost"] for c in out["cost_pairs"]
        ),
        "flood_ttft_ms": flood["flood"]["ttft_ms"],
    }
