"""The offline baseline of the online serving benchmark: the same workload through
``LLMEngine`` in this process, with the engine built exactly as ``loraplex serve`` builds
it (``engine_config`` of the same ``LORAPLEX_*`` settings, ``LLMEngine.from_model``).

Run as a subprocess of ``bench_serving.py`` (so its GPU memory is freed before the server
starts): ``python benchmarks/serving_offline.py SPEC.json OUT.json``, with the engine's
settings in the environment. The workload pieces are ``bench_throughput``'s: the same
prompts, adapter keys and weight files, Zipf picks, preload, warm-up and timed case.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import adapter_refs, preload, prompts, run_engine_case, warm_up
from common import device_info, write_json, zipf_indices
from serving_runs import FAIR_SUMS, queue_split

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.presets import PRESETS
from loraplex.engine_wiring import engine_config
from loraplex.gateway.settings import GatewaySettings
from loraplex.heap import freeze_heap


def prompt_set(args: argparse.Namespace, vocab: int, n: int, salt: int) -> list[list[int]]:
    """``bench_throughput.prompts`` under seed ``args.seed + salt`` (salt 0: the same ids
    as the offline case)."""
    return prompts(argparse.Namespace(seed=args.seed + salt, prompt_len=args.prompt_len), vocab, n)


WARM_SALT = 1_000_003  # the warm-up's prompts: never the timed runs'


def run_offline(args: argparse.Namespace, weights_root: Path) -> dict:
    cfg = PRESETS[args.model.removeprefix("dummy:")]
    config = engine_config(GatewaySettings())  # the LORAPLEX_* settings, as serve reads them
    t0 = time.perf_counter()
    engine = LLMEngine.from_model(args.model, config)
    startup = time.perf_counter() - t0
    print(f"offline: {args.model} ready in {startup:.1f}s ({config})", flush=True)
    refs = adapter_refs(args, cfg, args.adapters, weights_root)
    load_s = preload(engine, refs) if refs else 0.0
    warm_up(engine, prompt_set(args, cfg.vocab_size, len(refs) + 1, WARM_SALT), [None, *refs])
    freeze_heap()  # as the server's engine process does once ready (a process of its own here)
    ids = prompt_set(args, cfg.vocab_size, args.num_requests, 0)
    row = run_engine_case(args, engine, ids, refs)
    rates = [float(x) for x in str(getattr(args, "rates", "")).split(",") if x.strip()]
    replay = getattr(args, "replay", "server")
    shapes = ("plain", "server") if replay == "both" else (replay,)
    row["poisson"] = [
        run_poisson(args, engine, prompt_set(args, cfg.vocab_size, args.num_requests,
                                             1000 * (k + 1)), refs, rate, args.seed + k, shape)
        for k, rate in enumerate(rates)
        for shape in shapes
    ]  # fmt: skip
    engine.shutdown()
    row.update(
        ms_per_step=row["seconds"] * 1e3 / max(row["steps"], 1),
        tokens_per_step=args.num_requests * args.output_len / max(row["steps"], 1),
        req_s=args.num_requests / row["seconds"],
        startup_s=startup,
        preload_s=load_s,
    )
    import torch

    row["info"] = device_info(config.resolved_device())
    if torch.cuda.is_available():
        row["info"]["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def pcts(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    at = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(xs)}


def fair_sums(engine: LLMEngine) -> dict[str, float]:
    """The engine's per-key queue counters summed over the keys, named as
    ``serving_runs.parse_metrics`` names them from a server's ``/metrics``."""
    out: dict[str, float] = {}
    for f in engine.stats().fairness.values():
        for family in FAIR_SUMS:
            value = float(getattr(f, family))
            out["fair:" + family] = out.get("fair:" + family, 0.0) + value
    return out


def run_poisson(
    args: argparse.Namespace,
    engine: LLMEngine,
    ids: list[list[int]],
    refs: list[AdapterRef],
    rate: float,
    seed: int,
    shape: str = "server",
) -> dict:
    """The engine alone under the HTTP run's Poisson arrivals (same gaps, prompts and picks):
    each request is added when its arrival time has passed (checked between steps, as the
    engine server's loop takes new requests), so its TTFT here is the engine's own share of
    the TTFT a client sees: queueing for a step, its prefill, the step that reads the token.
    ``shape`` "server": each request as the gateway hands it to the engine (its tenant's
    fairness key, ``min_tokens`` as sent); "plain": no fairness key, no ``min_tokens``."""
    n = len(ids)
    gen, at, offsets = random.Random(seed), 0.0, []
    for _ in range(n):
        offsets.append(at)
        at += gen.expovariate(rate)
    picks = zipf_indices(len(refs), n, args.zipf, seed=args.seed) if refs else [None] * n
    server = shape == "server"
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True,
                            min_tokens=args.output_len if server else 0)  # fmt: skip
    tenants = max(1, int(getattr(args, "tenants", 1)))

    def fair_key(i: int, a: int | None) -> str | None:  # as plan_requests picks the key
        return f"t{(i if a is None else a) % tenants}" if server else None

    added, first, end, toks = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
    nxt, done, steps = 0, 0, 0
    fair0 = fair_sums(engine)
    t0 = time.perf_counter()
    while done < n:
        now = time.perf_counter() - t0
        while nxt < n and offsets[nxt] <= now:
            a = picks[nxt]
            engine.add_request(Request(f"p{seed}{shape[0]}-{nxt}", ids[nxt], params,
                                       None if a is None else refs[a],
                                       fairness_key=fair_key(nxt, a)))  # fmt: skip
            added[nxt] = time.perf_counter() - t0
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.002, offsets[nxt] - now)) if nxt < n else 0.0)
            continue
        outs = engine.step()
        steps += int(engine.last_step_ran)
        t = time.perf_counter() - t0
        for o in outs:
            i = int(o.request_id.rsplit("-", 1)[1])
            got = sum(len(c.token_ids) for c in o.choices)
            if got and not toks[i]:
                first[i] = t
            toks[i] += got
            if o.finished:
                if o.error:
                    raise RuntimeError(f"{o.request_id}: {o.error.message}")
                end[i], done = t, done + 1
    ttft = [(first[i] - added[i]) * 1e3 for i in range(n)]
    tpot = [(end[i] - first[i]) * 1e3 / max(toks[i] - 1, 1) for i in range(n)]
    fair1 = fair_sums(engine)
    out = {"rate": rate, "shape": shape, "requests": n, "seconds": max(end), "steps": steps,
           "ttft_ms": pcts(ttft), "tpot_ms": pcts(tpot),
           **queue_split({k: fair1[k] - fair0.get(k, 0.0) for k in fair1})}  # fmt: skip
    print(f"offline Poisson {rate:g}/s ({shape} requests): TTFT p50 {out['ttft_ms']['p50']:.1f} p99 "
          f"{out['ttft_ms']['p99']:.1f} ms, TPOT p50 {out['tpot_ms']['p50']:.1f} ms", flush=True)  # fmt: skip
    return out


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    args = argparse.Namespace(**spec["args"])
    write_json(argv[1], run_offline(args, Path(spec["weights_root"])))


if __name__ == "__main__":
    main(sys.argv[1:])
