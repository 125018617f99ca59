"""Online serving benchmark: the real HTTP API, streamed, under load, against the offline
engine on the same workload.

One command: ``PYTHONPATH=. python benchmarks/bench_serving.py --baseline`` (``--smoke``:
``dummy:tiny`` on the CPU, a handful of requests, in well under a minute). Workload:
``--num-requests`` streamed ``/v1/completions`` (``--endpoint chat``: chat completions)
with token-id prompts of exactly ``--prompt-len`` tokens and exactly ``--output-len``
output tokens (``min_tokens`` + ``ignore_eos``, greedy); each request's ``model`` is one of
``--adapters`` rank-``--rank`` adapters drawn with Zipf(``--zipf``) popularity (0: the base
model), called with the key of the tenant that owns it (``--tenants``).

Load: a closed loop of ``--concurrency`` streams, then Poisson arrivals at each of
``--rates`` (req/s); every run has fresh prompts (the closed loop has the offline case's),
so no run hits the KV prefix cache of another. Server: ``--serve`` (the default) starts
``loraplex serve`` with a fresh data directory and the engine settings as ``LORAPLEX_*``
variables and stops it at the end; ``--url`` uses a running one (``--admin-token``,
``--model-name``). ``--baseline`` first runs the same workload through ``LLMEngine``
in a subprocess (``serving_offline.py``; engine built from the same settings), then the
server: they cannot share one GPU at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import adapter_refs
from common import write_json, zipf_indices
from serving_client import ClientPool, Planned, chat_body, completion_body, make_client
from serving_fairness import FairnessScenario
from serving_offline import WARM_SALT, pcts, prompt_set
from serving_report import offline_row, report, run_row
from serving_runs import Runner
from serving_server import ServeProcess, child_env, free_port
from serving_setup import make_tenancy

from loraplex.engine.model.presets import PRESETS
from loraplex.supervisor import default_workers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b", help="dummy:<preset>")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=256, help="closed-loop streams (0: none)")
    p.add_argument("--rates", default="", help="Poisson rates, req/s, e.g. 10,21.6,30")
    p.add_argument(
        "--replay",
        choices=("server", "plain", "both"),
        default="server",
        help="the offline Poisson replay's requests: as the gateway sends them (fairness key "
        "of the tenant, min_tokens), plain (neither), or both, one after the other",
    )
    p.add_argument("--adapters", type=int, default=32, help="0: the base model")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--weight-files", type=int, default=8, help="distinct random weight files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--baseline", action="store_true", help="the offline engine first")
    p.add_argument("--busy-steps", type=int, default=40, help="offline: GPU-busy window, steps")
    p.add_argument("--busy-window-at", type=float, default=0.3, help="offline: where it starts")
    server = p.add_mutually_exclusive_group()
    server.add_argument("--serve", action="store_true", help="start loraplex serve (default)")
    server.add_argument("--url", default=None, help="a running server instead")
    p.add_argument("--admin-token", default=os.environ.get("LORAPLEX_ADMIN_TOKEN"))
    p.add_argument("--model-name", default=None, help="the base model's API name (--url)")
    p.add_argument("--workers", type=int, default=None, help="gateway workers (serve's default)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--contended-prefill-tokens",
        type=int,
        default=None,
        help="the engine's prefill bound for tenants over their share (default: the "
        "server's own, LORAPLEX_CONTENDED_PREFILL_TOKENS)",
    )
    p.add_argument("--max-loras", type=int, default=32, help="GPU LoRA slots")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="CPU only")
    p.add_argument("--upload-workers", type=int, default=4)
    p.add_argument("--metrics-interval", type=float, default=1.0, help="s; 0: no sampling")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None)
    f = p.add_argument_group("fairness scenario (issue #21; serving_fairness.py)")
    f.add_argument("--fairness", action="store_true", help="run it instead of the load runs")
    f.add_argument("--fair-light-rate", type=float, default=4.0, help="light tenant, req/s")
    f.add_argument("--fair-light-requests", type=int, default=40)
    f.add_argument("--fair-flood-streams", type=int, default=None, help="default 2x max seqs")
    f.add_argument("--fair-flood-requests", type=int, default=1500)
    f.add_argument("--fair-settle-s", type=float, default=4.0, help="flood alone before light")
    f.add_argument("--fair-pair-streams", type=int, default=None, help="default max seqs")
    f.add_argument("--fair-pair-requests", type=int, default=800)
    f.add_argument("--fair-window-at-s", type=float, default=3.0)
    f.add_argument("--fair-window-s", type=float, default=6.0)
    f.add_argument(
        "--fair-pair-output-spread",
        type=float,
        default=0.5,
        help="cost pairs: output lengths uniform over --output-len +- this fraction of it",
    )
    f.add_argument(
        "--fair-cost-repeats",
        type=int,
        default=1,
        help="pairs of one-key / two-key runs for the cost of fairness (its median)",
    )
    p.add_argument("--smoke", action="store_true", help="dummy:tiny on the CPU, tiny counts")
    p.add_argument(
        "--client-procs",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 4)),
        help="client processes sending the timed runs (0: this process's event loop)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.num_requests, args.prompt_len, args.output_len = "dummy:tiny", 12, 16, 8
        args.adapters, args.tenants, args.weight_files, args.concurrency = 2, 2, 2, 4
        args.rates, args.baseline, args.workers, args.max_num_seqs = "6", True, 1, 8
        args.max_num_batched_tokens, args.max_loras, args.metrics_interval = 128, 2, 0.5
        args.kv_cache_bytes, args.startup_timeout, args.client_procs = 64 * 2**20, 120.0, 2
        if not os.environ.get("LORAPLEX_BENCH_SMOKE_CUDA"):
            args.device = "cpu"
        if args.fairness:
            args.tenants, args.adapters, args.weight_files, args.baseline = 4, 8, 2, False
            args.max_loras = 4  # two tenants' adapters at once
            args.fair_light_requests, args.fair_flood_requests, args.fair_settle_s = 4, 600, 0.5
            args.fair_pair_requests, args.fair_window_at_s, args.fair_window_s = 40, 0.5, 1.0
            args.fair_cost_repeats = min(args.fair_cost_repeats, 2)
            # the pairs' longest outputs (28 tokens) past output_len + the context margin
            # (24): the server's context must be sized by the longest (longest_output)
            args.fair_pair_output_spread = 2.5
    if not args.model.startswith("dummy:"):
        raise SystemExit("--model must be a dummy:<preset> (random adapters of its shapes)")
    args.rate_list = [float(x) for x in args.rates.split(",") if x.strip()]
    args.fair_flood_streams = args.fair_flood_streams or 2 * args.max_num_seqs
    args.fair_pair_streams = args.fair_pair_streams or args.max_num_seqs
    args.fair_procs = max(1, args.client_procs // 2)  # the two closed loops side by side
    if args.fairness and args.client_procs < 1:
        raise SystemExit("--fairness needs --client-procs >= 1")
    args.model_name = args.model_name or args.model  # serve's name of a dummy model
    return args


def longest_output(args: argparse.Namespace) -> int:
    """The most tokens a request of the run asks for: ``--output-len``, or with
    ``--fairness`` the cost pairs' longest (``--fair-pair-output-spread`` past it). The
    H100 run of 12-06 sized the context by ``--output-len`` and lost 599 of 800 one-key
    requests to context_length_exceeded."""
    if not args.fairness:
        return args.output_len
    return math.ceil(args.output_len * (1 + args.fair_pair_output_spread))


def engine_settings(args: argparse.Namespace) -> dict[str, str]:
    """The engine's settings, for the server and for the offline baseline alike."""
    s = {
        "LORAPLEX_MODEL": args.model,
        "LORAPLEX_DEVICE": args.device,
        "LORAPLEX_DTYPE": args.dtype,
        "LORAPLEX_MAX_MODEL_LEN": args.prompt_len + longest_output(args) + 16,
        "LORAPLEX_MAX_NUM_SEQS": args.max_num_seqs,
        "LORAPLEX_MAX_NUM_BATCHED_TOKENS": args.max_num_batched_tokens,
        "LORAPLEX_MAX_LORAS": args.max_loras,
        "LORAPLEX_MAX_LORA_RANK": args.rank,
        "LORAPLEX_GPU_MEMORY_UTILIZATION": args.gpu_memory_utilization,
    }
    if args.kv_cache_bytes:
        s["LORAPLEX_KV_CACHE_BYTES"] = args.kv_cache_bytes
    if args.contended_prefill_tokens:
        s["LORAPLEX_CONTENDED_PREFILL_TOKENS"] = args.contended_prefill_tokens
    return {k: str(v) for k, v in s.items()}


def run_baseline(args: argparse.Namespace, work: Path) -> dict:
    """``serving_offline.py`` in a subprocess (its GPU memory goes with it)."""
    spec, out = work / "offline-spec.json", work / "offline.json"
    keep = {k: v for k, v in vars(args).items() if k not in ("rate_list", "admin_token")}
    spec.write_text(json.dumps({"args": keep, "weights_root": str(work / "weights")}))
    script = Path(__file__).with_name("serving_offline.py")
    env = child_env(engine_settings(args))
    subprocess.run([sys.executable, str(script), str(spec), str(out)], env=env, check=True)
    return json.loads(out.read_text())


def plan_requests(
    args, tenancy, ids: list[list[int]], picks: list[int | None], output_len: int
) -> list[Planned]:
    """Request i: prompt ``ids[i]``, adapter ``picks[i]`` called with the key of the tenant
    that owns it (None: the base model, with the keys of the tenants in turn)."""
    plan = []
    for i, (prompt, adapter) in enumerate(zip(ids, picks, strict=True)):
        tenant = (adapter if adapter is not None else i) % args.tenants
        model = tenancy.adapters[adapter] if adapter is not None else args.model_name
        if args.endpoint == "chat":
            text = "".join(chr(97 + t % 26) for t in prompt)  # a token a letter (dummy:)
            path, body = "/v1/chat/completions", chat_body(model, text, output_len)
        else:
            path, body = "/v1/completions", completion_body(model, prompt, output_len)
        plan.append(Planned(i, tenant, adapter, tenancy.keys[tenant], path, body))
    return plan


def timed_plan(args, tenancy, vocab: int, salt: int) -> list[Planned]:
    """The timed workload: the offline case's Zipf picks; its prompts at salt 0."""
    n = args.num_requests
    picks = zipf_indices(args.adapters, n, args.zipf, seed=args.seed) if args.adapters else []
    ids = prompt_set(args, vocab, n, salt)
    return plan_requests(args, tenancy, ids, picks or [None] * n, args.output_len)


def warm_plan(args, tenancy, vocab: int) -> list[Planned]:
    """The base model and every adapter once, 4 tokens each (as the offline warm-up)."""
    ids = prompt_set(args, vocab, args.adapters + 1, WARM_SALT)
    return plan_requests(args, tenancy, ids, [None, *range(args.adapters)], 4)


async def http_runs(
    args,
    url: str,
    tenancy,
    vocab: int,
    result: dict,
    server_pid: int | None = None,
    admin_token: str = "",
) -> None:
    pool = ClientPool(args.client_procs) if args.client_procs > 0 else None
    try:
        async with make_client(args.request_timeout) as client:
            runner = Runner(client, url, args, pool, server_pid)
            if args.fairness:
                await runner.warm_up(warm_plan(args, tenancy, vocab))
                scenario = FairnessScenario(args, runner, tenancy, vocab, url, admin_token)
                await scenario.run_all(result)
            else:
                await _runs(args, runner, tenancy, vocab, result)
    finally:
        if pool is not None:
            pool.close()


async def _runs(args, runner: Runner, tenancy, vocab: int, result: dict) -> None:  # type: ignore[no-untyped-def]
    result["server"]["warmup"] = await runner.warm_up(warm_plan(args, tenancy, vocab))
    print(f"warm-up: {result['server']['warmup']}", flush=True)
    if args.concurrency > 0:
        print(f"closed loop, {args.concurrency} streams", flush=True)
        plan = timed_plan(args, tenancy, vocab, 0)
        result["runs"].append(await runner.closed(plan, args.concurrency))
        write_json(args.json, result)
    for k, rate in enumerate(args.rate_list):
        plan = timed_plan(args, tenancy, vocab, 1000 * (k + 1))
        print(f"Poisson arrivals, {rate:g} req/s", flush=True)
        result["runs"].append(await runner.poisson(plan, rate, args.seed + k))
        write_json(args.json, result)


def ledger_split(url: str, token: str, result: dict) -> None:
    """Split each run's TTFT with the usage ledger's own ``ttft_ms`` (the gateway's clock,
    from its engine call's start to the first token): ``gateway_ttft_ms`` holds the engine,
    the engine boundary and the gateway's stream handling; ``outside_ttft_ms`` (client TTFT
    minus it) the client, HTTP, auth, model resolution, tokenizing and admission."""
    try:
        resp = httpx.get(
            f"{url}/admin/v1/usage/export",
            params={"granularity": "request", "format": "jsonl", "from": "2000-01-01T00:00:00Z"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=120.0,
            trust_env=False,
        )
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"ledger split: no usage export ({exc})", flush=True)
        return
    ttft = {}
    for line in resp.text.splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("ttft_ms") is not None:
                ttft[row["request_id"]] = float(row["ttft_ms"])
    for run in result["runs"]:
        inner, outside = [], []
        for r in run.get("records", []):
            g = ttft.get(r.get("id") or "")
            if g is not None and r.get("ttft") is not None:
                inner.append(g)
                outside.append(r["ttft"] * 1e3 - g)
        run["gateway_ttft_ms"], run["outside_ttft_ms"] = pcts(inner), pcts(outside)


def server_session(args, refs, work: Path, vocab: int, result: dict) -> None:
    """Start the server (``--serve``) or use ``--url``; tenants, keys, adapters; the runs;
    the server stopped whatever happens."""
    serve, url, token = None, args.url, args.admin_token
    if url is None:
        settings = engine_settings(args)
        settings["LORAPLEX_PORT"] = str(args.port or free_port())
        if args.workers:
            settings["LORAPLEX_WORKERS"] = str(args.workers)
        serve = ServeProcess.start(settings, work / "data")
    try:
        if serve is not None:
            url, token = serve.url, serve.admin_token(args.startup_timeout)
            ready_s = serve.wait_ready(args.startup_timeout, args.workers or default_workers())
            result["server"]["startup_s"] = ready_s
            print(f"loraplex serve ready at {url} in {ready_s:.1f}s", flush=True)
        result["server"]["url"] = url
        if not token:
            raise SystemExit("--url needs --admin-token (or LORAPLEX_ADMIN_TOKEN)")
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        dirs = [Path(r.uri) for r in refs]
        tenancy = make_tenancy(url, token, prefix, args.tenants, dirs, args.upload_workers)
        result["server"].update(upload_s=tenancy.upload_s, upload_bytes=tenancy.upload_bytes)
        print(
            f"{args.tenants} tenants, {args.adapters} adapters uploaded "
            f"({tenancy.upload_bytes / 2**20:.0f} MiB) in {tenancy.upload_s:.1f}s",
            flush=True,
        )
        pid = None if serve is None else serve.proc.pid
        asyncio.run(http_runs(args, url, tenancy, vocab, result, pid, token))
        ledger_split(url, token, result)
        fair = result.get("fairness", {})
        light = [fair[k]["light"] for k in ("light_alone", "light_flood") if k in fair]
        if light:
            ledger_split(url, token, {"runs": light})
            for k in ("light_alone", "light_flood"):
                if k in fair:
                    run = fair[k]["light"]
                    print(
                        f"fairness {k}: TTFT in the gateway's engine call "
                        f"{run.get('gateway_ttft_ms')}, outside it {run.get('outside_ttft_ms')}",
                        flush=True,
                    )
    finally:
        if serve is not None:
            result["server"]["stop"] = serve.stop()
            result["server"]["log_tail"] = serve.log_tail(60)
        write_json(args.json, result)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = PRESETS[args.model.removeprefix("dummy:")]
    keep = {k: v for k, v in vars(args).items() if k not in ("rate_list", "admin_token")}
    result: dict = {"bench": "serving", "args": keep, "offline": None, "server": {}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="lpx-serving-") as tmp:
        work = Path(tmp)
        refs = adapter_refs(args, cfg, args.adapters, work / "weights")  # written once
        if args.baseline:
            result["offline"] = run_baseline(args, work)
            write_json(args.json, result)
        server_session(args, refs, work, cfg.vocab_size, result)
    closed = next((r for r in result["runs"] if r["mode"] == "closed"), None)
    off = result["offline"]
    if closed is not None and off is not None:
        result["http_over_offline"] = {
            "out_tok_s": closed["out_tok_s"] / off["out_tok_s"],
            "ms_per_step": closed["engine"]["ms_per_step"] / off["ms_per_step"],
        }
    ok = [
        r["rate"]
        for r in result["runs"]
        if r["mode"] == "poisson" and not r["errors"] and r["ttft_ms"]["p99"] <= args.slo_ttft_ms
    ]
    result["max_rate_ttft_p99_ok"] = max(ok) if ok else None
    write_json(args.json, result)
    rows = ([offline_row(off)] if off else []) + [run_row(r) for r in result["runs"]]
    if rows:
        print(report(result, rows, args), flush=True)
    return result


if __name__ == "__main__":
    main()
