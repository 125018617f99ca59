"""Structured outputs under load: a closed-loop batch where half the requests carry a JSON
schema, against the same batch unconstrained.

One command (CUDA, a few minutes): ``PYTHONPATH=. python benchmarks/bench_structured.py``
(``--smoke``: a handful of requests on the CPU). Model: ``--model`` (default: the SmolLM2
GGUF, whose real tokenizer the grammars are compiled for; a small model is the hard case,
its steps are short so a mask's host time weighs most).

Workload: ``--num-requests`` chat requests kept ``--concurrency`` in flight (closed loop: a
finished request is replaced at once). Every other request is constrained: a JSON schema out
of ``--schemas`` generated ones (``benchmarks/json_schemas.py``: nested objects, arrays,
enums, unions), ``max_tokens`` above the schema's bound on a valid value; the rest are
unconstrained with ``--free-len`` tokens (``ignore_eos``). Requests go through ``--adapters``
rank-16 LoRA adapters round robin (every ``--adapters + 1``-th: the base model).

Cases, on one model runner, each with a fresh engine: ``constrained`` (as above), then
``unconstrained``: the SAME requests (prompts, adapters) without schemas, each constrained
one replaced by an ``ignore_eos`` request of exactly the length its constrained run
produced, so both cases compute the same tokens. Reported: tokens/s of each, their ratio
(the target is >= 0.9), the host time per step spent filling and sending masks
(``grammar_mask_ms / grammar_mask_steps``) and per mask row, and how many constrained
outputs validate against their schema (``jsonschema``; all must: the exit status is 1, after
the JSON, when one does not stop or validate, with the finish reasons and errors of a few
in ``not_stopped_examples``). Grammars are compiled
before the clock starts (each schema once; compilation runs in worker threads in serving,
off the step loop).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_info, pick_device, write_json, write_peft_adapter
from json_schemas import max_output_bytes, schemas

from loraplex.engine.api import AdapterRef, Grammar, Request, SamplingParams
from loraplex.engine.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.model.loader import default_model_path
from loraplex.engine.model.presets import PRESETS
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.offline import run_requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--num-requests", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--schemas", type=int, default=64)
    p.add_argument("--free-len", type=int, default=96)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="a few requests on the CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.num_requests, a.concurrency, a.schemas, a.free_len, a.adapters = 12, 6, 4, 8, 2
    return a


def make_runner(a: argparse.Namespace, device: torch.device) -> ModelRunner:
    return ModelRunner(
        a.model or default_model_path(),
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        max_num_seqs=a.concurrency,
        max_model_len=1024,
        max_loras=max(1, a.adapters),
        max_lora_rank=a.rank,
        gpu_memory_utilization=a.gpu_memory_utilization,
        kv_cache_bytes=256 * 2**20 if device.type == "cpu" else None,
        max_num_batched_tokens=8192,
    )


def make_engine(a: argparse.Namespace, runner: ModelRunner) -> LLMEngine:
    cfg = EngineConfig(
        max_num_seqs=a.concurrency,
        max_num_batched_tokens=8192,
        max_model_len=runner.max_model_len,
        max_loras=max(1, a.adapters),
        max_lora_rank=a.rank,
        max_cpu_loras=max(1, a.adapters),
    )
    return LLMEngine(runner, cfg)


def workload(
    a: argparse.Namespace, tok, refs: list[AdapterRef]
) -> list[tuple[Request, dict | None]]:
    pool = schemas(a.schemas, seed=11)
    out: list[tuple[Request, dict | None]] = []
    for i in range(a.num_requests):
        chat = [{"role": "user", "content": f"Item {i}: describe it as JSON."}]
        ids = list(
            tok.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        k = i % (len(refs) + 1)
        adapter = refs[k - 1] if k else None
        if i % 2 == 0:
            schema = pool[(i // 2) % len(pool)]
            p = SamplingParams(
                max_tokens=max_output_bytes(schema) + 1,
                temperature=0.0 if i % 4 else 0.8,
                seed=i,
                grammar=Grammar("json_schema", json.dumps(schema)),
            )
            out.append((Request(f"r{i}", ids, p, adapter), schema))
        else:
            p = SamplingParams(max_tokens=a.free_len, temperature=0.0, ignore_eos=True)
            out.append((Request(f"r{i}", ids, p, adapter), None))
    return out


def closed_loop(engine: LLMEngine, requests: list[Request], concurrency: int) -> dict:
    """All requests, ``concurrency`` in flight; per request its token ids and finish."""
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    before = engine.stats()
    tokens, finish, errors = run_requests(engine, requests, concurrency)
    wall = time.perf_counter() - t0
    after = engine.stats()
    gen = sum(len(t) for t in tokens.values())
    steps = after.steps - before.steps
    mask_steps = after.grammar_mask_steps - before.grammar_mask_steps
    mask_ms = after.grammar_mask_ms - before.grammar_mask_ms
    mask_rows = after.grammar_mask_rows - before.grammar_mask_rows
    return {
        "wall_s": round(wall, 3),
        "generated_tokens": gen,
        "tokens_per_s": round(gen / wall, 1),
        "steps": steps,
        "step_ms": round(wall * 1000 / max(1, steps), 3),
        "mask_steps": mask_steps,
        "mask_ms_per_step": round(mask_ms / mask_steps, 3) if mask_steps else 0.0,
        "mask_rows_per_step": round(mask_rows / mask_steps, 1) if mask_steps else 0.0,
        "mask_us_per_row": round(mask_ms * 1000 / mask_rows, 2) if mask_rows else 0.0,
        "_tokens": tokens,
        "_finish": finish,
        "_errors": errors,
    }


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = pick_device(a.smoke)
    runner = make_runner(a, device)
    tok = runner.tokenizer
    cfg = PRESETS["smollm2-135m"] if a.model is None else None
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        refs = []
        if a.adapters:
            if cfg is None:
                raise SystemExit("--adapters needs the default model (adapter shapes)")
            refs = [
                AdapterRef(
                    f"lora{i}", str(write_peft_adapter(Path(tmp) / f"l{i}", cfg, a.rank, seed=i))
                )
                for i in range(a.adapters)
            ]
        work = workload(a, tok, refs)

        engine = make_engine(a, runner)
        for r, _ in work:  # compile every schema before the clock (each once)
            if r.sampling.grammar is not None:
                engine.grammars.get(r.sampling.grammar).result()
        warm = [r for r, _ in work[: 2 * (len(refs) + 1)]]  # adapters into host memory
        closed_loop(engine, [_renamed(r, "warm") for r in warm], a.concurrency)
        con = closed_loop(engine, [r for r, _ in work], a.concurrency)

        valid, invalid, cut, cut_examples = 0, [], 0, []
        reasons: Counter[str] = Counter()
        for r, schema in work:
            if schema is None:
                continue
            text = tok.decode(con["_tokens"][r.request_id], skip_special_tokens=True)
            reason = con["_finish"].get(r.request_id) or "none"
            reasons[reason] += 1
            if reason != "stop":
                cut += 1
                if len(cut_examples) < 3:
                    error = con["_errors"].get(r.request_id)
                    cut_examples.append(
                        (r.request_id, reason, error, r.sampling.max_tokens, text[:300])
                    )
                continue
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                invalid.append((r.request_id, str(exc)[:120], text[:200]))

        same = []
        for r, schema in work:
            n = len(con["_tokens"][r.request_id])
            p = SamplingParams(max_tokens=max(1, n), temperature=0.0, ignore_eos=True)
            same.append(Request(r.request_id, r.prompt, p if schema else r.sampling, r.adapter))
        engine2 = make_engine(a, runner)
        closed_loop(engine2, [_renamed(r, "warm") for r in warm], a.concurrency)
        free = closed_loop(engine2, same, a.concurrency)
        engine.shutdown()
        engine2.shutdown()

    for case in (con, free):
        case.pop("_tokens"), case.pop("_finish"), case.pop("_errors")
    result = {
        "bench": "structured",
        "model": a.model or "SmolLM2-135M-Instruct (GGUF)",
        "num_requests": a.num_requests,
        "concurrency": a.concurrency,
        "schemas": a.schemas,
        "adapters": a.adapters,
        "constrained": con,
        "unconstrained": free,
        "throughput_ratio": round(con["tokens_per_s"] / free["tokens_per_s"], 3),
        "schema_outputs_valid": valid,
        "schema_outputs_invalid": len(invalid),
        "schema_outputs_not_stopped": cut,
        "invalid_examples": invalid[:5],
        "constrained_finish_reasons": dict(reasons),
        "not_stopped_examples": cut_examples,
        **device_info(device),
    }
    print(json.dumps(result, indent=2))
    if a.json:
        write_json(a.json, result)
    return result


def _renamed(r: Request, prefix: str) -> Request:
    return Request(f"{prefix}-{r.request_id}", r.prompt, r.sampling, r.adapter)


def failed(result: dict) -> str:
    """Why the run does not count ("" when it does): every constrained request must end
    with ``stop`` and validate, or the throughput ratio compares unconstrained batches."""
    cut, invalid = result["schema_outputs_not_stopped"], result["schema_outputs_invalid"]
    if not cut and not invalid:
        return ""
    return (
        f"{cut} constrained requests did not stop (finish reasons "
        f"{result['constrained_finish_reasons']}) and {invalid} did not validate"
    )


if __name__ == "__main__":
    problem = failed(main())
    if problem:
        raise SystemExit(f"bench_structured: FAILED: {problem}")
