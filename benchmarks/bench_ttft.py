"""The first token of a lone request on an idle engine, taken apart.

Issue #14's TTFT p99 and issue #21's light tenant both carry a fixed first-token cost: on the
H200 (``bench_serving.py --fairness``), a 256-token prompt alone on an idle engine spent 64 ms
p50 inside the gateway's engine call, for a few ms of GPU work. This benchmark measures that
cost on the engine core alone (``LLMEngine``, as the engine server runs it, no HTTP, no IPC),
step by step:

- per prompt length (``--prompt-lens``) and with / without an adapter (``--adapters`` resident
  rank-``--rank`` adapters, all seven projections, loaded and warm first): ``--reps`` requests
  of fresh random prompts (no prefix-cache hit), one at a time, each on an idle engine;
- per request: wall time from ``add_request`` to the first output carrying a token, how many
  ``step()`` calls that took, and for each of those steps the host time of ``step()``, the
  host time of the runner's ``run`` (input building and the forward's launches), and the
  GPU time from the step's first launch to its sampler's last (CUDA events; read after the
  request, so nothing waits for them while it runs);
- ``--sync``: the same with async scheduling off (the first token is read in the step that
  samples it rather than after the next step's launch);
- ``--load N``: the same probes (fairness key ``light``) while a flood keeps N requests of
  ``--load-prompt``/``--load-output`` tokens in flight under its own key (each finished one
  replaced; adapters in turn), as ``bench_serving.py --fairness`` does over HTTP: the steps
  the first token waits for are then the flood's, and their mean host and GPU times are
  reported beside it;
- ``--profile DIR``: a torch profiler trace of one 256-token request with an adapter
  (``ttft.json``, chrome format) and its ops by host time, printed; then a cProfile of five
  such requests (``ttft_py.txt``, by own time and by cumulative time).

Output: per case, the medians of TTFT, steps, the first step's host / run / GPU ms and the
host time the first token waited beyond the forward's GPU time.

    PYTHONPATH=. python benchmarks/bench_ttft.py --json /tmp/ttft.json     # H200
    .venv/bin/python benchmarks/bench_ttft.py --smoke                      # CPU, dummy:tiny
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import device_info, pick_device, table, write_json, write_peft_adapter

from loraplex.engine.api import AdapterRef, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model_runner import ModelRunner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--prompt-lens", default="32,256,1024")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--adapters", type=int, default=8, help="resident adapters (0: base only)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--sync", action="store_true", help="also without async scheduling")
    p.add_argument(
        "--prefill-graphs",
        choices=["on", "off", "both"],
        default="on",
        help="prefill / mixed steps from the runner's piecewise CUDA graphs (GPU), eager, or "
        "each case both ways, eager first",
    )
    p.add_argument("--load", type=int, default=0, help="flood requests in flight (0: idle)")
    p.add_argument("--load-prompt", type=int, default=256)
    p.add_argument("--load-output", type=int, default=128)
    p.add_argument("--profile", default=None, help="dir for a torch profiler trace")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="dummy:tiny on the CPU, tiny counts")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.prompt_lens, args.reps, args.adapters = "dummy:tiny", "8,32", 3, 2
        args.max_num_batched_tokens, args.max_lora_rank = 256, 16
        args.max_num_seqs, args.load_prompt, args.load_output = 8, 8, 4
        if args.load:
            args.load = 16
    return args


class StepClock:
    """Host and GPU time of each ``step()`` while on: wraps the engine's ``step``, the
    runner's ``run`` and the sampler's ``sample`` (CUDA events on a GPU, read afterwards)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.cuda = engine.runner.device.type == "cuda"
        self.steps: list[dict] = []
        step, run, sample = engine.step, engine.runner.run, engine.sampler.sample

        def timed_step():  # type: ignore[no-untyped-def]
            rec = {"run_ms": 0.0, "start": None, "end": None}
            self.steps.append(rec)
            t0 = time.perf_counter()
            out = step()
            rec["host_ms"] = (time.perf_counter() - t0) * 1e3
            rec["ran"] = engine.last_step_ran
            return out

        def timed_run(batch, prev_tokens=None):  # type: ignore[no-untyped-def]
            rec = self.steps[-1]
            if self.cuda:
                rec["start"] = torch.cuda.Event(enable_timing=True)
                rec["start"].record()
            t0 = time.perf_counter()
            out = run(batch, prev_tokens)
            rec["run_ms"] += (time.perf_counter() - t0) * 1e3
            rec["tokens"] = batch.num_tokens
            return out

        def timed_sample(logits, rows, masks=None):  # type: ignore[no-untyped-def]
            out = sample(logits, rows, masks)
            if self.cuda and self.steps and self.steps[-1]["start"] is not None:
                self.steps[-1]["end"] = torch.cuda.Event(enable_timing=True)
                self.steps[-1]["end"].record()
            return out

        engine.step, engine.runner.run, engine.sampler.sample = timed_step, timed_run, timed_sample
        self._restore = (engine.runner, run)

    def close(self) -> None:
        """Give the runner (shared by the next engine) its own ``run`` back."""
        runner, run = self._restore
        runner.run = run

    def gpu_ms(self, rec: dict) -> float:
        if rec["start"] is None or rec["end"] is None:
            return float("nan")
        return rec["start"].elapsed_time(rec["end"])


def make_engine(args, runner: ModelRunner, async_scheduling: bool) -> LLMEngine:
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=runner.max_model_len,
        max_lora_rank=args.max_lora_rank,
        async_scheduling=async_scheduling,
    )
    return LLMEngine(runner, cfg)


class Flood:
    """``--load``: ``n`` requests in flight under the key ``flood``, each finished one
    replaced (adapters in turn), fed by the outputs the probe's loop does not take."""

    def __init__(self, args, engine: LLMEngine, refs: list[AdapterRef], gen) -> None:  # type: ignore[no-untyped-def]
        self.args, self.engine, self.refs, self.gen = args, engine, refs, gen
        self.count = 0
        for _ in range(args.load):
            self.add()

    def add(self) -> None:
        a, i = self.args, self.count
        self.count += 1
        vocab = self.engine.runner.config.vocab_size
        ids = torch.randint(3, vocab, (a.load_prompt,), generator=self.gen).tolist()
        params = SamplingParams(max_tokens=a.load_output, temperature=0.0, ignore_eos=True)
        ref = self.refs[i % len(self.refs)] if self.refs else None
        self.engine.add_request(Request(f"flood-{i}", ids, params, ref, fairness_key="flood"))

    def __call__(self, out) -> None:  # type: ignore[no-untyped-def]
        if out.error:
            raise RuntimeError(f"{out.request_id}: {out.error.message}")
        if out.finished:
            self.add()

    def settle(self, steps: int) -> None:
        for _ in range(steps):
            for o in self.engine.step():
                self(o)


def first_token(  # type: ignore[no-untyped-def]
    engine: LLMEngine, clock: StepClock, rid: str, ids: list[int], ref, flood=None
) -> dict:
    """One request (key ``light``) until its first token is out, then aborted; on an idle
    engine, or beside ``flood`` (which takes every other output)."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    clock.steps = []
    t0 = time.perf_counter()
    engine.add_request(Request(rid, ids, params, ref, fairness_key="light"))
    ttft = None
    while ttft is None:
        for o in engine.step():
            if o.request_id == rid and (o.error or any(c.token_ids for c in o.choices)):
                if o.error:
                    raise RuntimeError(f"{rid}: {o.error.message}")
                ttft = (time.perf_counter() - t0) * 1e3
            elif o.request_id != rid and flood is not None:
                flood(o)
    steps = list(clock.steps)
    engine.abort(rid)
    while flood is None and engine.has_unfinished():
        engine.step()
    if clock.cuda:
        torch.cuda.synchronize(engine.runner.device)
    ran = [s for s in steps if s.get("ran")]
    first = ran[0] if ran else steps[0]
    gpu = clock.gpu_ms(first)
    gpus = [clock.gpu_ms(s) for s in ran]
    return {
        "ttft_ms": ttft,
        "steps": len(steps),
        "first_step_host_ms": first["host_ms"],
        "first_step_run_ms": first["run_ms"],
        "first_step_gpu_ms": gpu,
        "first_step_tokens": first.get("tokens", 0),
        "after_first_step_ms": ttft - first["host_ms"],
        "host_beyond_gpu_ms": ttft - gpu if gpu == gpu else float("nan"),
        "steps_host_ms_mean": statistics.fmean(s["host_ms"] for s in ran) if ran else 0.0,
        "steps_gpu_ms_mean": statistics.fmean(gpus) if gpus else float("nan"),
        "steps_tokens_mean": statistics.fmean(s.get("tokens", 0) for s in ran) if ran else 0.0,
    }


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run_cases(  # type: ignore[no-untyped-def]
    args, engine: LLMEngine, clock: StepClock, refs: list[AdapterRef], mode: str, gen, flood=None
) -> list[dict]:
    vocab = engine.runner.config.vocab_size
    out = []
    for n in [int(x) for x in args.prompt_lens.split(",")]:
        for ref in [None, *refs[:1]]:
            reps = []
            for i in range(args.reps):
                ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
                reps.append(first_token(engine, clock, f"{mode}-{n}-{i}", ids, ref, flood))
                if flood is not None:
                    flood.settle(3)  # the next probe arrives into a steady loop again
            row = {"steps_mode": mode, "prompt": n, "adapter": ref is not None}
            row["load"] = args.load
            for k in reps[0]:
                row[k] = med(reps, k)
            row["ttft_p90_ms"] = sorted(r["ttft_ms"] for r in reps)[int(0.9 * (len(reps) - 1))]
            out.append(row)
            print(
                f"{mode:7} prompt {n:5} {'adapter' if ref else 'base   '}: TTFT p50 "
                f"{row['ttft_ms']:.1f} ms in {row['steps']:.0f} steps; first step host "
                f"{row['first_step_host_ms']:.1f} (run {row['first_step_run_ms']:.1f}), GPU "
                f"{row['first_step_gpu_ms']:.1f} ms",
                flush=True,
            )
    return out


def profile_one(args, engine: LLMEngine, clock: StepClock, refs: list[AdapterRef], gen) -> str:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    ids = torch.randint(3, engine.runner.config.vocab_size, (256,), generator=gen).tolist()
    with profile(activities=acts) as prof:
        first_token(engine, clock, "profiled", ids, refs[0] if refs else None)
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "ttft.json"))
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out / "ttft_ops.txt").write_text(text)
    print("\nops of one 256-token first token, by host time\n" + text, flush=True)
    # the Python side of the same: where the host time of the eager first step goes
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for i in range(5):
        first_token(engine, clock, f"pyprof-{i}", ids, refs[0] if refs else None)
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(45)
    (out / "ttft_py.txt").write_text(buf.getvalue())
    print("\nPython of five 256-token first tokens (cProfile)\n" + buf.getvalue(), flush=True)
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    result: dict = {"bench": "ttft", "args": vars(args), "info": device_info(device)}
    longest = max(int(x) for x in args.prompt_lens.split(","))
    runner = ModelRunner(
        args.model,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        block_size=16,
        max_num_seqs=args.max_num_seqs,
        max_model_len=max(longest, 256, args.load_prompt + args.load_output) + 64,
        max_lora_rank=args.max_lora_rank,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_bytes=64 * 2**20 if device.type == "cpu" else None,
    )
    if runner.prefill_graphs is not None:
        pg = runner.prefill_graphs
        result["prefill_graphs"] = {"buckets": pg.buckets, "widths": pg.widths, "s": pg.build_s}
        print(
            f"prefill graphs: buckets {pg.buckets}, LoRA widths {pg.widths}, captured in "
            f"{pg.build_s:.1f} s",
            flush=True,
        )
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lpx-ttft-") as tmp:
        refs = []
        for i in range(args.adapters):
            d = Path(tmp) / f"a{i}"
            write_peft_adapter(d, runner.config, args.rank, seed=i)
            refs.append(AdapterRef(f"ttft-{i}", str(d)))
        modes = [("async", True)] + ([("sync", False)] if args.sync else [])
        graphs = runner.prefill_graphs
        ways = {"on": [True], "off": [False], "both": [False, True]}[args.prefill_graphs]
        modes = [(m, on, w) for m, on in modes for w in ways]
        for mode, on, graphed in modes:
            runner.prefill_graphs = graphs if graphed else None
            if graphs is not None and len(ways) > 1:
                mode = f"{mode}{'+g' if graphed else '-g'}"
            engine = make_engine(args, runner, on)
            clock = StepClock(engine)  # once: it wraps the engine's step, run and sample
            try:
                for i, ref in enumerate(refs or [None]):
                    ids = torch.randint(3, 100, (16,), generator=gen).tolist()
                    engine.add_request(
                        Request(f"warm-{mode}-{i}", ids, SamplingParams(max_tokens=4), ref)
                    )
                while engine.has_unfinished():  # loads, slot writes, compiles
                    engine.step()
                    if not engine.last_step_ran:
                        time.sleep(0.005)
                for n in [int(x) for x in args.prompt_lens.split(",")]:  # shapes warm once
                    ids = torch.randint(3, 100, (n,), generator=gen).tolist()
                    for ref in [None, *refs[:1]]:
                        first_token(engine, clock, f"w{n}", ids, ref)
                flood = None
                if args.load:
                    flood = Flood(args, engine, refs, gen)
                    flood.settle(2 * args.load_output)  # admitted, finishing and replaced
                rows += run_cases(args, engine, clock, refs, mode, gen, flood)
                if args.profile is not None and mode == "async":
                    result["profile_ops"] = profile_one(args, engine, clock, refs, gen)
            finally:
                clock.close()
                engine.shutdown()
                runner.prefill_graphs = graphs
    cols = ["steps_mode", "load", "prompt", "adapter", "ttft_ms", "ttft_p90_ms", "steps"]
    cols += ["first_step_host_ms", "first_step_run_ms", "first_step_gpu_ms"]
    cols += ["after_first_step_ms", "host_beyond_gpu_ms", "steps_host_ms_mean"]
    cols += ["steps_gpu_ms_mean", "steps_tokens_mean"]
    where = f"beside {args.load} flood requests" if args.load else "on an idle engine"
    print(f"\nfirst token {where} (medians, ms)\n" + table(rows, cols), flush=True)
    result["cases"] = rows
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
