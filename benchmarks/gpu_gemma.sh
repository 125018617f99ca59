#!/usr/bin/env bash
# Gemma 2 / Gemma 3 on the GPU, in sections that each fit one 10-minute device call:
#
#   SECTIONS="tests gemma3" OUT=/some/dir bash benchmarks/gpu_gemma.sh      (~6 min)
#   SECTIONS="gemma2 long" OUT=/some/dir bash benchmarks/gpu_gemma.sh       (~7 min)
#   SECTIONS="window" OUT=/some/dir bash benchmarks/gpu_gemma.sh            (~5 min)
#
# tests: the windowed / soft-capped attention kernels in bf16 at Gemma's head shapes, and
# tests/engine/test_gpu_gemma.py (bf16, CUDA graphs, gemma-2-9b's and gemma-3-12b's shapes
# and windows, prompts past the window, base + 3 adapters vs HF+PEFT float32);
# gemma3 / gemma2: bench_throughput on dummy:gemma3-12b / dummy:gemma2-9b, no adapters
# against 32 (the default workload: 1,000 requests of 256 + 128 tokens, Zipf 1.0);
# long: dummy:gemma3-12b with 2,048-token prompts (twice its 1,024 window), 0 and 32;
# window: the sliding-window KV layout on the GPU: the engine through the windowed tables
# with CUDA graphs (tests/engine/test_family_engine.py -m gpu), then bench_window_kv.py on
# dummy:gemma3-12b (the local layers' blocks given back, against one table for every layer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-gemma}
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-tests gemma3}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/gemma.log
status=0
source benchmarks/gpu_step.sh  # step NAME SECONDS CMD...

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee -a "$LOG"

for s in $SECTIONS; do
  case $s in
    tests)
      step "gemma kernel tests" 120 $PY -m pytest -m gpu -q -p no:cacheprovider -rs -x \
        --confcutdir=tests/kernels tests/kernels/test_attention.py -k "gemma or llama"
      step "gemma bf16 parity" 300 $PY -m pytest -m gpu -q -s -p no:cacheprovider -rs \
        --confcutdir=tests/engine tests/engine/test_gpu_gemma.py
      ;;
    gemma3)
      step "bench_throughput gemma3-12b" 300 $PY benchmarks/bench_throughput.py \
        --model dummy:gemma3-12b --adapters 0,32 --hf-adapters "" \
        --json "$OUT/throughput_gemma3.json"
      ;;
    gemma2)
      step "bench_throughput gemma2-9b" 300 $PY benchmarks/bench_throughput.py \
        --model dummy:gemma2-9b --adapters 0,32 --hf-adapters "" \
        --json "$OUT/throughput_gemma2.json"
      ;;
    long)
      step "bench_throughput gemma3-12b, 2k prompts" 280 $PY benchmarks/bench_throughput.py \
        --model dummy:gemma3-12b --adapters 0,32 --hf-adapters "" --num-requests 256 \
        --prompt-len 2048 --output-len 128 --json "$OUT/throughput_gemma3_long.json"
      ;;
    window)
      step "windowed engine on the GPU" 120 $PY -m pytest -m gpu -q -p no:cacheprovider -rs \
        --confcutdir=tests/engine tests/engine/test_family_engine.py
      step "bench_window_kv gemma3-12b" 300 $PY benchmarks/bench_window_kv.py \
        --json "$OUT/window_kv.json"
      ;;
    *) echo "unknown section $s" | tee -a "$LOG" && status=1 ;;
  esac
done
echo "=== done rc=$status ($(date -u +%T))" | tee -a "$LOG"
exit $status
