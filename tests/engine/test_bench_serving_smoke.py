"""``benchmarks/bench_serving.py --smoke`` end to end on the CPU: the offline baseline in a
subprocess, then ``loraplex serve`` as a process, tenants, keys and adapters through the
admin API, a closed loop and a Poisson run of streamed completions, the server stopped.
The numbers must add up exactly (every request succeeds with exactly ``--output-len``
tokens); the metric helpers are checked on hand-made records."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
MODULES = ("bench_serving", "bench_throughput", "common", "serving_client", "serving_metrics",
           "serving_fairness", "serving_offline", "serving_report", "serving_runs",
           "serving_server", "serving_setup", "pyspy_summary")  # fmt: skip


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    monkeypatch.delenv("LORAPLEX_BENCH_SMOKE_CUDA", raising=False)
    yield importlib.import_module
    for name in MODULES:
        sys.modules.pop(name, None)


def finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def queue_split_ok(d: dict) -> None:
    """The engine's share of a run's TTFT: each request is scheduled at the earliest at the
    first step after it arrives (so at least 1 step), and its first token comes after."""
    assert finite(d["queue_steps_mean"]) and d["queue_steps_mean"] >= 1, d
    assert finite(d["queue_ms_mean"]) and d["queue_ms_mean"] >= 0, d
    assert finite(d["first_token_ms_mean"]) and d["first_token_ms_mean"] > d["queue_ms_mean"], d


@pytest.mark.slow
def test_serving_smoke(bench, tmp_path):
    path = tmp_path / "serving.json"
    out = bench("bench_serving").main(["--smoke", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved.keys() == out.keys() and len(saved["runs"]) == len(out["runs"]) == 2
    a = out["args"]
    n, out_len, prompt_len = a["num_requests"], a["output_len"], a["prompt_len"]

    off = out["offline"]
    assert off["requests"] == n and off["adapters"] == a["adapters"] == 2
    assert finite(off["out_tok_s"]) and off["out_tok_s"] > 0 and off["steps"] > 0

    assert [r["mode"] for r in out["runs"]] == ["closed", "poisson"]
    for run in out["runs"]:
        assert run["errors"] == {}, run["errors"]
        assert run["requests"] == run["completed"] == n
        assert run["output_tokens"] == n * out_len  # exact lengths, counted from usage
        assert run["prompt_tokens"] == n * prompt_len  # token-id prompts are exact too
        assert [r["out"] for r in run["records"]] == [out_len] * n
        assert {r["tenant"] for r in run["records"]} == {0, 1}
        assert {r["adapter"] for r in run["records"]} <= {0, 1}
        for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
            d = run[metric]
            assert all(finite(d[k]) and d[k] >= 0 for k in d), (metric, d)
            assert d["p50"] <= d["p90"] <= d["p99"]
        assert 0 < run["ttft_ms"]["p50"] <= run["e2e_s"]["p99"] * 1e3
        assert 0 < run["chunks_per_token"] <= 1
        assert run["out_tok_s"] > 0 and 0 <= run["goodput_req_s"] <= run["req_s"]
        eng = run["engine"]
        assert eng["steps"] > 0 and finite(eng["ms_per_step"])
        assert eng["preemptions"] == 0 and eng["adapter_load_failures"] == 0
        assert eng["adapter_misses"] == 0  # the warm-up made every adapter resident
        queue_split_ok(eng)
    assert [p["requests"] for p in off["poisson"]] == [n]  # the replay of the Poisson run
    queue_split_ok(off["poisson"][0])

    ratio = out["http_over_offline"]
    assert all(finite(v) and v > 0 for v in ratio.values()), ratio
    assert out["max_rate_ttft_p99_ok"] in (None, float(a["rates"]))
    stop = out["server"]["stop"]
    assert stop["left_running"] == [] and stop["exit_code"] in (0, -15)
    assert out["server"]["warmup"]["requests"] == 3


@pytest.mark.slow
def test_fairness_smoke(bench, tmp_path):
    """The fairness scenario end to end (issue #21's runs against ``loraplex serve``): every
    request of every run succeeds, and the per-key numbers read from ``/metrics`` are there
    (queue time, arrival in the engine to first token, service tokens, the flood's steps)."""
    out = bench("bench_serving").main(
        ["--smoke", "--fairness", "--fair-cost-repeats", "2", "--json", str(tmp_path / "f.json")]
    )
    f = out["fairness"]
    assert list(f) == ["light_alone", "light_flood", "light_flood_fifo", "one_key", "two_keys",
                       "cost_pairs", "derived"]  # fmt: skip
    assert len(f["cost_pairs"]) == 2 and all(c["two_keys"] > 0 for c in f["cost_pairs"])
    costs = sorted(c["cost"] for c in f["cost_pairs"])
    assert f["derived"]["fairness_throughput_cost_median"] == (costs[0] + costs[1]) / 2
    # the steady window's cost: decode tokens counted in both runs' windows
    assert all(c["one_key_window"] > 0 and c["two_keys_window"] > 0 for c in f["cost_pairs"])
    w = sorted(c["window_cost"] for c in f["cost_pairs"])
    assert f["derived"]["fairness_window_cost_median"] == (w[0] + w[1]) / 2
    n = out["args"]["fair_light_requests"]
    for name in ("light_alone", "light_flood", "light_flood_fifo"):
        run = f[name]
        assert run["light"]["completed"] == n and run["light"]["errors"] == {}, name
        # the light tenant's key (beside the flood, the key with fewer requests)
        mine = min(run["keys"].values(), key=lambda k: k["scheduled"])
        assert mine["scheduled"] >= n, run["keys"]
        assert finite(mine["queue_ms_mean"]) and mine["queue_ms_mean"] >= 0
        assert finite(mine["queue_steps_mean"]) and mine["queue_steps_mean"] >= 1
        assert finite(mine["engine_first_token_ms_mean"]) and mine["engine_first_token_ms_mean"] > 0
        assert mine["engine_first_token_steps_mean"] >= 1
        assert mine["prefill_tokens"] >= n * out["args"]["prompt_len"]
    for name in ("light_flood", "light_flood_fifo"):
        run = f[name]
        assert run["flood"]["errors"] == {} and run["flood_outlasted_light"]
        assert finite(run["step_ms_mean"]) and run["step_ms_mean"] > 0
        assert set(run["server_cores"]) == {"engine", "gateway"}
    for name in ("one_key", "two_keys"):
        run = f[name]["all"] if name == "one_key" else f[name]
        assert run["out_tok_s"] > 0
    # the cost pairs' requests of mixed lengths, each answered with exactly its own
    lo, hi = f["one_key"]["output_len_range"]
    assert 1 <= lo < out["args"]["output_len"] < hi
    assert f["one_key"]["all"]["errors"] == {}
    assert f["two_keys"]["tenant2"]["errors"] == {} and f["two_keys"]["tenant3"]["errors"] == {}
    # the one-key run's requests split 3:1 as the weights, so both loops end about together
    done = (f["two_keys"]["tenant2"]["completed"], f["two_keys"]["tenant3"]["completed"])
    assert done == (3 * done[1], f["one_key"]["all"]["completed"] // 4), done
    # two adapters a tenant: one key over its two, two keys over one each
    assert (f["one_key"]["adapters"], f["two_keys"]["adapters"]) == (2, 2)
    assert f["derived"]["light_queue_ms"]["alone"] >= 0
    assert f["derived"]["light_queue_steps"]["alone"] >= 1


def test_metrics_flag_inexact_lengths(bench):
    m = bench("serving_metrics")
    good = m.RequestRecord(0, 0, 0, ttft=0.1, e2e=0.8, chunk_times=[0.1, 0.2, 0.8])
    good.output_tokens, good.finish_reason = 8, "length"
    short = m.RequestRecord(1, 1, None, ttft=0.1, e2e=0.5, chunk_times=[0.1, 0.5])
    short.output_tokens, short.finish_reason = 7, "stop"
    missing = m.RequestRecord(2, 0, 1, ttft=0.1, e2e=0.5, chunk_times=[0.1])
    failed = m.RequestRecord(3, 0, 1, status=429, error="http_429")
    for r in (good, short, missing, failed):
        m.check_output(r, 8)
    assert [r.error for r in (good, short, missing, failed)] == [
        None,
        "wrong_length",
        "no_usage",
        "http_429",
    ]
    s = m.summarize([good, short, missing, failed], 2.0, slo_ttft_s=0.2, slo_tpot_s=0.05)
    assert s["errors"] == {"http_429": 1, "no_usage": 1, "wrong_length": 1}
    assert s["completed"] == 1 and s["output_tokens"] == 8 and s["out_tok_s"] == 4.0
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # (0.8 - 0.1) / 7
    assert s["goodput_req_s"] == 0.0  # TPOT 100 ms > 50 ms
    assert s["itl_ms"]["p50"] == pytest.approx(350.0)  # gaps 0.1 and 0.6 s
    assert m.dist([1, 2, 3, 4, 5])["p90"] == pytest.approx(4.6)
    assert all(math.isnan(v) for v in m.dist([]).values())


def test_pyspy_summary_per_process_and_thread(bench, tmp_path, capsys):
    """Samples go to the innermost process frame (a child's under ``--subprocesses``) and
    its thread: own samples at the leaf, samples under each frame once per stack."""
    raw = tmp_path / "prof.txt"
    parent = 'process 1:"python3 bench_serving.py"'
    engine = 'process 7:"python3 -m loraplex.main engine --listen x"'
    raw.write_text(
        "\n".join(
            [
                f"{parent};thread (1): MainThread;main (b.py:1);sleep (b.py:2) 5",
                f"{parent};{engine};thread (8): engine-step;loop (s.py:1);step (e.py:2);sync (c.py:3) 6",
                f"{parent};{engine};thread (8): engine-step;loop (s.py:1);step (e.py:2);launch (e.py:9) 3",
                f"{parent};{engine};thread (8): engine-step;loop (s.py:1);wait (s.py:4) 1",
                f"{parent};{engine};thread (7): MainThread;serve (v.py:1) 2",
                "not a sample line",
            ]
        )
        + "\n"
    )
    bench("pyspy_summary").main([str(raw), "--process", "loraplex.main engine"])
    out = capsys.readouterr().out
    assert "       12  " + engine in out and "        5  " + parent in out
    step = out.split("== thread (8): engine-step: 10 samples")[1].split("== thread (7)")[0]
    own, under = step.split("-- samples under:")
    assert "       6  60.0%  sync (c.py:3)" in own and "       3  30.0%  launch (e.py:9)" in own
    assert "      10 100.0%  loop (s.py:1)" in under and "       9  90.0%  step (e.py:2)" in under
    assert "== thread (7): MainThread: 2 samples" in out
