#!/usr/bin/env bash
# Qwen3-MoE on one H200 (issue 18), from anywhere:
#
#   OUT=/some/dir SECTIONS="layer tests" bash benchmarks/gpu_moe.sh   # one call, ~6 min
#   OUT=/some/dir SECTIONS=throughput bash benchmarks/gpu_moe.sh      # a second, ~7 min
#   OUT=/some/dir SECTIONS=throughput_beside bash benchmarks/gpu_moe.sh  # a third, ~7 min
#
# layer: benchmarks/bench_moe_lora.py, one Qwen3-30B-A3B MoE layer with 32 rank-8 expert
# adapters (Zipf): the old expert-LoRA path (per-token SGMV over repeated rows, every step)
# and the new ones (per-token reading the token rows: decode; grouped segments: prefill)
# checked against the torch references, then timed in one process (CUDA graphs) at 64, 256,
# 2048 and 8192 tokens, printing lora/base per variant and old/new;
# tests: the fused-MoE and expert-LoRA kernel tests on the GPU (fp32, fp16, bf16, a CUDA
# graph replay), and bf16 parity with HF + PEFT (fp32) at Qwen3-30B-A3B's layer shapes
# (2 layers; graphs and eager);
# throughput: benchmarks/bench_throughput.py on dummy:qwen3-30b-a3b (~61 GB of bf16
# weights), no adapters vs 32 adapters (rank 8 on attention and every expert, Zipf), HF
# skipped. The adapter arena gets 60 % of what the weights leave (32 resident adapters at
# ~0.85 GB each), the host cache 40 % of the machine's memory. Target: >= 0.85x. The case
# 32f: the same with the experts' gate/up delta added before the activation, not in it.
# throughput_beside: the same with --moe-lora-beside (decode steps' expert LoRA as deltas
# beside the grouped GEMMs, off by default until this measures it), its own no-adapter case.
# (layer prints the same choice for one layer: the "beside" row and beside/token.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-moe}
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-layer tests throughput}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/moe.log
status=0
source benchmarks/gpu_step.sh  # step NAME SECONDS CMD...

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee -a "$LOG"

for s in $SECTIONS; do
  case $s in
    layer)
      step "moe layer: expert LoRA old vs new" 240 $PY benchmarks/bench_moe_lora.py \
        --tokens 64,256,2048,8192 --adapters 32 --rank 8
      ;;
    tests)
      step "moe kernel tests" 120 $PY -m pytest -q -p no:cacheprovider -rs \
        --confcutdir=tests/kernels tests/kernels/test_fused_moe.py
      step "moe bf16 parity" 200 $PY -m pytest -m gpu -q -s -p no:cacheprovider -rs \
        --confcutdir=tests/engine tests/engine/test_gpu_moe.py
      ;;
    throughput)
      step "bench_throughput moe" 420 $PY benchmarks/bench_throughput.py \
        --model dummy:qwen3-30b-a3b --adapters 0,32,32f --rank 8 --weight-files 4 \
        --num-requests 512 --prompt-len 256 --output-len 128 --hf-adapters '' \
        --lora-memory-fraction 0.6 --host-lora-memory-fraction 0.4 \
        --json "$OUT/throughput_moe.json"
      ;;
    throughput_beside)
      step "bench_throughput moe, expert LoRA beside" 420 $PY benchmarks/bench_throughput.py \
        --model dummy:qwen3-30b-a3b --adapters 0,32 --rank 8 --weight-files 4 \
        --num-requests 512 --prompt-len 256 --output-len 128 --hf-adapters '' \
        --lora-memory-fraction 0.6 --host-lora-memory-fraction 0.4 --moe-lora-beside \
        --json "$OUT/throughput_moe_beside.json"
      ;;
    *) echo "unknown section $s" | tee -a "$LOG"; status=1 ;;
  esac
done
exit $status
