#!/usr/bin/env bash
# Issues 17/18/26: the per-token LoRA kernels' program order (tokens grouped by adapter, so
# that the tokens of one adapter find its A and B in L2, against batch order) and the decode
# graphs' path choice, on one GPU, from anywhere:
#
#   OUT=/some/dir [SECTIONS="tests decode moe throughput"] bash benchmarks/gpu_lora_decode.sh
#
# tests: the GPU kernel tests (tests/kernels -m gpu);
# decode: benchmarks/bench_decode.py, dummy:llama3-8b bf16, batch 32 and 256 at context 320,
#   no adapter / 32 / 132 / all distinct rank-16 adapters in a pool of max rank 64 (the
#   engine's default), each mix also in batch order (-batch), on the segment kernels (-seg)
#   and on the per-token kernels in both orders (-tok, -tok-batch): every variant in one run;
#   then a per-kernel profile of each adapter mix at batch 256 ($OUT/prof);
# moe: benchmarks/bench_moe_lora.py, one Qwen3-30B-A3B MoE layer with 32 rank-8 expert
#   adapters, the expert LoRA's per-token kernels in (adapter, expert) order and in batch order
#   (token / token-batch) at 256 and 2,048 tokens;
# throughput: benchmarks/bench_throughput.py, 1,000 requests, 32 adapters, per-token kernels
#   grouped and in batch order, alternated, against no adapter (issue 17's 0.92x).
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
SECTIONS=${SECTIONS:-tests decode moe throughput}
has tests && step "GPU kernel tests" 200 $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/kernels
has decode && step "bench_decode: token order and path" 300 $PY benchmarks/bench_decode.py \
  --batches 32,256 --modes base,shared32,shared132,distinct --context 320 --rank 16 --steps 20 \
  --max-lora-rank 64 --token-order sorted,batch --force-segment --force-token \
  --json "$OUT/decode_order.json" --profile "$OUT/prof" --profile-batch 256
has moe && step "bench_moe_lora: expert LoRA order" 200 $PY benchmarks/bench_moe_lora.py \
  --tokens 256,2048 --adapters 32 --rank 8
has throughput && step "bench_throughput: token order" 420 $PY benchmarks/bench_throughput.py \
  --adapters 0,32,32b,0,32b,32 --hf-adapters "" --json "$OUT/throughput_order.json"
exit $status
