#!/usr/bin/env bash
# Issues 17/18/26: where the LoRA time of a decode step goes, on one GPU, from anywhere:
#
#   OUT=/some/dir [SECTIONS="tests decode sweep moe throughput"] bash benchmarks/gpu_lora_decode.sh
#   (~19 min in all)
#
# tests: the GPU kernel tests (tests/kernels -m gpu);
# decode: benchmarks/bench_decode.py, dummy:llama3-8b bf16, batch 32 and 256 at context 320,
#   no adapter / 32 / 132 / all distinct rank-16 adapters in a pool of max rank 64 (the
#   engine's default), each mix on the path the graphs pick, on the segment kernels (-seg)
#   and on the per-token kernels (-tok); then a per-kernel profile of each mix at batch 256
#   ($OUT/prof/decode_profile.txt);
# sweep: benchmarks/sweep_decode_lora.py at batch 256 in a rank-64 pool, 132 adapters (the
#   2,000-adapter case's steps) and 32 Zipf adapters on 128 slots (the offline throughput's):
#   launch variants of the side-stream LoRA against the defaults before 12-05 (one [256, 16]
#   tile per expand program at every batch, ~49,000 short programs a layer at batch 256);
# moe: benchmarks/bench_moe_lora.py, one Qwen3-30B-A3B MoE layer with 32 rank-8 expert
#   adapters at 256 (a decode step) and 2,048 tokens: per-token against grouped, and the
#   per-token layer under the sweep's launch variants (--launch-variants);
# throughput: benchmarks/bench_throughput.py --adapters 0,32 (the offline ratio of issue 17)
#   with today's launch configs, then under the sweep's "before 12-05" variant, each against
#   its own no-adapter case.
# (The H200 run of 2026-12-04 13:39 UTC used this script's earlier form, with BASE=<checkout>
# for a before / after of the expand's loads: git show 1e6e045:benchmarks/gpu_lora_decode.sh.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-lora-decode}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/lora_decode.log
status=0
source benchmarks/gpu_step.sh  # step NAME SECONDS CMD..., has SECTION, banner
banner
SECTIONS=${SECTIONS:-tests decode sweep moe throughput}
has tests && step "GPU kernel tests" 400 $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/kernels
has decode && step "bench_decode: paths and profile" 300 $PY benchmarks/bench_decode.py \
  --batches 32,256 --modes base,shared32,shared132,distinct --context 320 --rank 16 --steps 20 \
  --max-lora-rank 64 --force-segment --force-token --json "$OUT/decode_paths.json" \
  --profile "$OUT/prof" --profile-batch 256
if has sweep; then
  step "sweep: batch 256, 132 adapters" 240 $PY benchmarks/sweep_decode_lora.py --batch 256 \
    --adapters 132 --max-lora-rank 64 --context 320 --steps 20
  step "sweep: batch 256, 32 Zipf adapters on 128 slots" 240 $PY benchmarks/sweep_decode_lora.py \
    --batch 256 --adapters 32 --zipf 1.0 --slots 128 --max-lora-rank 64 --context 320 --steps 20
fi
has moe && step "bench_moe_lora: per-token against grouped" 200 $PY benchmarks/bench_moe_lora.py \
  --tokens 256,2048 --adapters 32 --rank 8 --launch-variants
if has throughput; then
  step "bench_throughput: 32 adapters against none" 200 $PY benchmarks/bench_throughput.py \
    --adapters 0,32 --hf-adapters "" --json "$OUT/throughput.json"
  step "bench_throughput: the same, launch configs before 12-05" 200 \
    $PY benchmarks/bench_throughput.py --adapters 0,32 --hf-adapters "" \
    --launch-variant "before 12-05" --json "$OUT/throughput_before.json"
fi
exit $status
