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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import adapter_refs, preload, prompts, run_engine_case, warm_up
from common import device_info, write_json

from engine.llm_engine import LLMEngine
from engine.model.presets import PRESETS
from gateway.settings import GatewaySettings
from loraplex_cli.engine_wiring import engine_config


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
    ids = prompt_set(args, cfg.vocab_size, args.num_requests, 0)
    row = run_engine_case(args, engine, ids, refs)
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


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    args = argparse.Namespace(**spec["args"])
    write_json(argv[1], run_offline(args, Path(spec["weights_root"])))


if __name__ == "__main__":
    main(sys.argv[1:])
