"""The engine benchmarks' CPU smoke modes run end to end (``dummy:tiny``), so an engine API
change that breaks ``benchmarks/bench_decode.py``, ``bench_throughput.py`` or
``bench_lora_paging.py`` (and the others below) shows up here
rather than on the GPU machine."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    monkeypatch.delenv("LORAPLEX_BENCH_SMOKE_CUDA", raising=False)

    def load(name: str):
        return importlib.import_module(name)

    yield load
    for name in (
        "bench_decode", "bench_throughput", "bench_lora_paging", "bench_fp8", "bench_window_kv",
        "common",
    ):  # fmt: skip
        sys.modules.pop(name, None)


def test_decode_smoke(bench, tmp_path):
    out = bench("bench_decode").main(["--smoke", "--json", str(tmp_path / "d.json")])
    rows = out["rows"]
    assert {(r["batch"], r["mode"]) for r in rows} == {
        (b, m) for b in (1, 3) for m in ("base", "one", "distinct")
    }
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert (tmp_path / "d.json").is_file()


def test_cpu_lora_smoke(bench):
    out = bench("bench_cpu_lora").main(["--reps", "1", "--prompt-len", "8", "--rank", "8"])
    assert out["base_ms"] > 0 and out["adapter_ms"] > 0 and out["slots"] > 0


def test_fp8_smoke(bench, tmp_path):
    out = bench("bench_fp8").main(["--smoke", "--json", str(tmp_path / "f.json")])
    assert {(r["weights"], r["mode"]) for r in out["decode"]} == {
        (w, m) for w in ("bf16", "fp8") for m in ("base", "distinct")
    }
    assert out["prefill"]["fp8_tok_s"] > 0 and out["prefill"]["bf16_tok_s"] > 0
    for q in out["quality"]:
        assert 0.5 < q["greedy_agreement"] <= 1 and q["mean_kl"] >= 0
    assert "errors" not in out and (tmp_path / "f.json").is_file()


def test_fp8_quality_prompts_are_prose_on_a_real_model(bench):
    """A real model's quality prompts are windows of the docs' prose in its tokenizer (random
    token ids put a model at near-ties); a dummy model keeps random ids."""
    from types import SimpleNamespace

    from loraplex.engine.model.dummy_tokenizer import dummy_tokenizer

    b = bench("bench_fp8")
    tok = dummy_tokenizer(512)
    runner = SimpleNamespace(tokenizer=tok, vocab_size=512)
    paragraphs = b.prose_paragraphs()
    assert len(paragraphs) > 50 and not any("```" in x or x.startswith("|") for x in paragraphs)
    args = b.parse_args(["--model", "/some/model.gguf", "--prompts", "300", "--prompt-len", "24"])
    prompts = b.quality_prompts(args, runner)
    assert len(prompts) == 300 and {len(x) for x in prompts} == {24}
    texts = [tok.decode(x) for x in prompts]
    assert len(set(texts)) > 250 and any(t in " ".join(paragraphs) for t in texts[:5])
    args = b.parse_args(["--model", "dummy:tiny", "--prompts", "4", "--prompt-len", "8"])
    assert b.parse_args([]).prompt_text == "auto"
    random_ids = b.quality_prompts(args, runner)
    assert len(random_ids) == 4 and random_ids != b.quality_prompts(
        b.parse_args(["--model", "x.gguf", "--prompts", "4", "--prompt-len", "8"]), runner
    )


def test_throughput_smoke(bench, tmp_path):
    out = bench("bench_throughput").main(["--smoke", "--json", str(tmp_path / "t.json")])
    engine = {r["adapters"]: r for r in out["engine"] if r["heap"] == "frozen"}
    assert set(engine) == {0, 1, 4, 16}
    # the heap frozen after warm-up, as the engine server runs; a "u" case runs it unfrozen
    (unfrozen,) = [r for r in out["engine"] if r["heap"] == "default"]
    assert unfrozen["adapters"] == 4 and unfrozen["out_tok_s"] > 0
    assert all(r["out_tok_s"] > 0 and r["requests"] == 24 for r in engine.values())
    assert engine[0]["vs_no_adapter"] == 1.0
    # the adapter bytes each step read, and the bound they put on the ratio: one rank-16
    # adapter on every projection (float32 on the CPU) in every step of the 1-adapter case
    from loraplex.engine.model.presets import PRESETS

    one = bench("common").adapter_bytes(PRESETS["tiny"], 16, 4)
    assert out["copy_bandwidth_GBps"] == 4200 and "nominal" in out["copy_bandwidth_source"]
    assert engine[0]["adapters_per_step"] == 0 and engine[0]["bytes_bound"] == 1.0
    assert engine[1]["adapters_per_step"] == 1.0
    assert engine[1]["adapter_gb_per_step"] * 1e9 == pytest.approx(one)
    assert all(0 < r["bytes_bound"] < 1 for n, r in engine.items() if n)
    (hf,) = out["hf_peft"]
    assert hf["adapters"] == 4 and hf["out_tok_s"] > 0


def test_adapter_scale_smoke(bench, tmp_path):
    out = bench("bench_adapter_scale").main(["--smoke", "--json", str(tmp_path / "a.json")])
    for cpu in out["cpu"]:
        assert cpu["old_wall_min_ms"] > 0 and cpu["new_wall_min_ms"] > 0
    assert out["cpu"][-1]["torch_threads"] == 1
    assert out["single"]["p50_ms"] > 0 and out["single"]["adapter_mib"] > 0
    assert [r["workers"] for r in out["aggregate"]] == [1, 2]
    rows = {(r["setting"], r["adapters"], r["mode"]): r for r in out["engine"]}
    assert rows[("base", 0, "-")]["vs_base"] == 1.0
    assert rows[("base", 0, "-")]["bytes_bound"] == 1.0 and out["copy_bandwidth_GBps"] == 4200
    for key, r in rows.items():  # the bytes each step read of its adapters, and their bound
        if key[0] != "base":
            assert r["adapters_per_step"] >= 1 and r["adapter_gb_per_step"] > 0
            assert r["lora_step_bytes"] > 0 and 0 < r["bytes_bound"] < 1
    for setting in ("all7", "slora"):
        for n in (1, 3):
            disk, store = rows[(setting, n, "disk")], rows[(setting, n, "store")]
            assert disk["loads_in_run"] == n and disk["latency_ms"]["disk"][2] == n
            # store keys are content hashes: adapters sharing a weight file are one key
            assert store["latency_ms"]["object_store"][2] == min(n, 2)  # real downloads
            assert rows[(setting, n, "host")]["loads_in_run"] == 0  # all in the host tier
            assert rows[(setting, n, "used")]["loads_in_run"] == 0  # those the picks touch
    sys.modules.pop("bench_adapter_scale", None)
    sys.modules.pop("adapter_load_old", None)


def test_lora_paging_smoke(bench, tmp_path):
    out = bench("bench_lora_paging").main(["--smoke", "--json", str(tmp_path / "p.json")])
    # memory per adapter: its own bytes at every rank (q,v; q,k,v,o; all projections)
    per_rank = [r for r in out["memory"] if r["gpu/own"] == r["gpu/own"]]
    assert len(per_rank) == 12 and all(1.0 <= r["gpu/own"] <= 1.1 for r in per_rank)
    assert out["memory"][-1]["rank8_resident_in_128_padded_slots"] >= 4 * 128
    assert all(r["paged_us"] > 0 and r["padded_us"] > 0 for r in out["kernels"])
    one, many = out["engine"]
    assert (one["adapters"], many["adapters"]) == (1, 40)
    assert many["requests"] == 12 and many["out_tok_s"] > 0 and one["vs_1_adapter"] == 1.0


def test_ttft_smoke(bench, tmp_path):
    out = bench("bench_ttft").main(["--smoke", "--sync", "--json", str(tmp_path / "t.json")])
    rows = {(r["steps_mode"], r["prompt"], r["adapter"]): r for r in out["cases"]}
    assert set(rows) == {(m, n, a) for m in ("async", "sync") for n in (8, 32) for a in (0, 1)}
    for (mode, _, _), r in rows.items():
        # async scheduling reads a step's token after launching the next step; sync at once
        assert r["steps"] == (2 if mode == "async" else 1)
        assert 0 < r["first_step_run_ms"] <= r["first_step_host_ms"] <= r["ttft_ms"]
    assert (tmp_path / "t.json").is_file()
    # beside a flood of other requests the probe's steps carry the flood's tokens too
    loaded = bench("bench_ttft").main(["--smoke", "--load", "1"])
    for r in loaded["cases"]:
        alone = rows[("async", r["prompt"], r["adapter"])]
        assert r["load"] > 0 and r["steps"] >= 2
        assert r["steps_tokens_mean"] > alone["steps_tokens_mean"]
    sys.modules.pop("bench_ttft", None)


def test_window_kv_smoke(bench, tmp_path):
    """Both layouts serve the same requests to the end; the windowed one has more block ids
    (one layer group's each) and takes a longer request in the same memory."""
    out = bench("bench_window_kv").main(["--smoke", "--json", str(tmp_path / "w.json")])
    one, win = out["rows"]
    assert (one["layout"], win["layout"]) == ("one table", "windowed")
    assert win["block_ids"] == 6 * one["block_ids"]  # tiny-gemma3: 6 layers, 1 global
    assert win["request_tokens"] > one["request_tokens"]
    assert win["most_running"] >= one["most_running"]
    assert out["ratios"]["request_tokens"] > 1 and (tmp_path / "w.json").is_file()


def test_kernel_resources_compile_for_hopper_without_a_gpu(tmp_path):
    """The per-token LoRA kernels compile for sm_90 here (Triton's bundled ptxas) and the
    table reads their registers from the cubin: longer runs of B tiles per expand program
    mean fewer programs, and no configuration spills. In a process of its own: these tests
    run Triton interpreted, and the script compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = BENCH_DIR.parent
    env["PYTHONPATH"] = str(root)
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(BENCH_DIR / "kernel_resources.py"), "--tokens", "32"]
    subprocess.run([*cmd, "--json", str(out)], env=env, cwd=root, check=True, timeout=600)
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    one = rows["expand beside, 1 tile (decode graphs < 64 tokens)"]
    eight = rows["expand beside, 8 tiles"]
    assert one["programs_a_layer"] == 8 * eight["programs_a_layer"]
    for r in rows.values():
        assert 16 <= r["regs"] <= 255 and r["stack"] == 0, r
        assert 1 <= r["programs_per_sm"] <= 64 // r["warps"], r
