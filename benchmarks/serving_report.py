"""The online serving benchmark's human output: two short tables and the headline lines."""

from __future__ import annotations

import math

from common import table

MAIN = ["case", "ok", "errors", "seconds", "req_s", "out_tok_s", "goodput", "ttft_p50",
        "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50", "itl_p99", "e2e_p50"]  # fmt: skip
ENGINE = ["case", "steps", "ms_step", "tok_step", "batch", "preempt", "evictions", "loads",
          "chunk_tok", "client_cpu", "engine_cpu", "gateway_cpu"]  # fmt: skip


def offline_row(off: dict) -> dict:
    return {
        "case": "offline engine",
        "ok": f"{off['requests']}/{off['requests']}",
        "errors": "-",
        "seconds": off["seconds"],
        "req_s": off["req_s"],
        "out_tok_s": off["out_tok_s"],
        "steps": off["steps"],
        "ms_step": off["ms_per_step"],
        "tok_step": off["tokens_per_step"],
        "batch": off["mean_batch"],
        "preempt": off["preemptions"],
        "evictions": off["slot_evictions"],
        "loads": off["loads_in_run"],
    }


def run_row(r: dict) -> dict:
    e = r["engine"]
    case = f"closed {r['concurrency']}" if r["mode"] == "closed" else f"poisson {r['rate']:g}/s"
    errors = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
    return {
        "case": case,
        "ok": f"{r['completed']}/{r['requests']}",
        "errors": errors,
        "seconds": r["duration_s"],
        "req_s": r["req_s"],
        "out_tok_s": r["out_tok_s"],
        "goodput": r["goodput_req_s"],
        **{f"{m}_{p}": r[f"{m}_ms"][p] for m in ("ttft", "tpot", "itl") for p in ("p50", "p99")},
        "e2e_p50": r["e2e_s"]["p50"],
        "steps": int(e["steps"]) if math.isfinite(e["steps"]) else e["steps"],
        "ms_step": e["ms_per_step"],
        "tok_step": e["tokens_per_step"],
        "batch": e["batch_sampled"],
        "preempt": e["preemptions"],
        "evictions": e["adapter_evictions"],
        "loads": e["adapter_loads"],
        "chunk_tok": r["chunks_per_token"],
        "client_cpu": r["client_cpu"],
        "engine_cpu": r.get("server_cpu", {}).get("engine", math.nan),
        "gateway_cpu": r.get("server_cpu", {}).get("gateway", math.nan),
    }


def queue_note(d: dict) -> str:
    """The engine's share of the TTFT (``serving_runs.queue_split``), means over a run."""
    if d.get("queue_ms_mean") is None or d["queue_ms_mean"] != d["queue_ms_mean"]:
        return "queue counters absent"
    return (
        f"queued {d['queue_ms_mean']:.1f} ms ({d['queue_steps_mean']:.2f} steps) to be "
        f"scheduled, {d['first_token_ms_mean']:.1f} ms to the first token (means)"
    )


def report(result: dict, rows: list[dict], args) -> str:
    lines = [
        "\nengine per run (steps and ms/step from /metrics; batch: sampled while busy)",
        table(rows, ENGINE),
        f"\n{args.model}, {args.adapters} adapters r{args.rank} Zipf({args.zipf:g}) over "
        f"{args.tenants} tenants, {args.num_requests} requests {args.prompt_len}/"
        f"{args.output_len} tokens, /v1/{args.endpoint} streamed; latencies in ms (e2e in s); "
        f"goodput: req/s with TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= "
        f"{args.slo_tpot_ms:g} ms",
        table(rows, MAIN),
    ]
    for r, row in zip(result["runs"], rows[-len(result["runs"]) :], strict=False):
        for kind, detail in r["error_samples"].items():
            lines.append(f"{row['case']}: {kind}: {detail[:160]}")
    for r, row in zip(result["runs"], rows[-len(result["runs"]) :], strict=False):
        g, o = r.get("gateway_ttft_ms"), r.get("outside_ttft_ms")
        if g and o and g["p50"] == g["p50"]:
            lines.append(
                f"{row['case']}: TTFT in the gateway's ledger (engine call to first token) p50 / "
                f"p99 {g['p50']:.1f} / {g['p99']:.1f} ms; the rest of the client's TTFT p50 / "
                f"p99 {o['p50']:.1f} / {o['p99']:.1f} ms"
            )
        lines.append(f"{row['case']}: in the engine, {queue_note(r['engine'])}")
    off = result.get("offline") or {}
    for po in off.get("poisson", []):
        lines.append(
            f"engine alone under the same Poisson arrivals, {po['rate']:g} req/s "
            f"({po.get('shape', 'plain')} requests): TTFT p50 / p99 "
            f"{po['ttft_ms']['p50']:.1f} / {po['ttft_ms']['p99']:.1f} ms, TPOT p50 "
            f"{po['tpot_ms']['p50']:.1f} ms, {po['steps']} steps in {po['seconds']:.1f} s; "
            f"{queue_note(po)}"
        )
    ratio = result.get("http_over_offline")
    if ratio:
        lines.append(
            f"HTTP/offline, closed loop of {args.concurrency}: output tok/s "
            f"{ratio['out_tok_s']:.3f}, engine ms/step {ratio['ms_per_step']:.3f}"
        )
    if args.rate_list:
        best = result["max_rate_ttft_p99_ok"]
        rates = ", ".join(f"{x:g}" for x in args.rate_list)
        found = f"{best:g} req/s" if best is not None else "none"
        lines.append(
            f"highest Poisson rate with TTFT p99 <= {args.slo_ttft_ms:g} ms and no errors: "
            f"{found} (of {rates})"
        )
    stop = result["server"].get("stop")
    if stop:
        left = ", ".join(map(str, stop["left_running"])) or "nothing"
        lines.append(
            f"server stopped in {stop['stop_s']:.1f}s, exit {stop['exit_code']}, "
            f"left running: {left}"
        )
    return "\n".join(lines)
