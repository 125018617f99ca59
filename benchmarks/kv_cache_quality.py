"""What an FP8 KV cache (``--kv-cache-dtype fp8``: e4m3, scale 1) does to a real model's next
tokens: the same weights with the cache in the model's dtype and in FP8, teacher-forced on the
first runner's greedy tokens; greedy agreement per position and the mean KL(model dtype ||
FP8), without and with a random adapter. Runs on the CPU (the torch reference ops) or a GPU
(the Triton kernels):

    PYTHONPATH=. python3 benchmarks/kv_cache_quality.py --model default --prompts 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fp8 import load_adapters, quality
from common import write_json

from loraplex.engine.model.loader import default_model_path
from loraplex.engine.model_runner import ModelRunner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="default: the SmolLM2 GGUF")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prompt-text", default="auto", choices=("auto", "docs", "random"))
    p.add_argument("--steps", type=int, default=16, help="tokens per prompt")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = str(default_model_path()) if args.model == "default" else args.model
    args.quality_model = None
    per_seq = -(-(args.prompt_len + args.steps + 1) // 16)
    runners = {
        kv: ModelRunner(
            model,
            device=device,
            dtype=DTYPES[args.dtype],
            block_size=16,
            max_num_seqs=args.batch,
            max_model_len=per_seq * 16,
            max_loras=4,
            max_lora_rank=args.rank,
            num_blocks=args.batch * per_seq + 1,
            kv_cache_dtype=kv,
        )
        for kv in ("auto", "fp8")
    }
    rows = []
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="lpx-kvq-") as tmp:
        for kv, r in runners.items():
            load_adapters(args, r, Path(tmp) / kv)
        for adapter in (False, True):
            row = quality(args, runners["auto"], runners["fp8"], adapter)
            row.update(model=args.model, device=str(device), dtype=args.dtype)
            print(row, flush=True)
            rows.append(row)
    write_json(args.json, {"bench": "kv_cache_quality", "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
