#!/usr/bin/env bash
# The H100 runs behind docs/benchmarks.md, in sections that each fit one 10-minute device
# call, from anywhere:
#
#   SECTIONS="tests sgmv decode" OUT=/some/dir bash benchmarks/gpu_final.sh     (~7 min)
#   SECTIONS="throughput" OUT=/some/dir bash benchmarks/gpu_final.sh            (~7 min)
#
# tests: the gpu-marked tests of tests/kernels and tests/engine (conftest lookup cut at the
# package: the root conftest needs the database harness, which the GPU box lacks);
# sgmv: benchmarks/bench_sgmv.py --quick (exact metadata);
# decode: benchmarks/bench_decode.py, every batch and mix, LoRA beside the GEMMs (side stream)
# and in line (graphs recaptured), torch profiles and a host cProfile of batch 32;
# ops: benchmarks/bench_decode_ops.py (decode GEMMs and paged attention vs their floor);
# throughput: benchmarks/bench_throughput.py, no adapters twice, 1/32/512 adapters, 32 in
# line (with a cProfile of the step loop); hf: no adapters, 32 adapters and HF+PEFT (the
# two do not fit one call together); sweep: benchmarks/sweep_decode_lora.py; variants: the
# SGMV launch variants (bench_sgmv --variants, sweep_decode_lora at batch 32 and at ~250
# sequences over 32 Zipf adapters); tuned: sweep_decode_lora's rules against the table the
# runner's warm-up tuning fills (ModelRunner.tune_lora), at three decode mixes.
# Each step runs under its own time limit; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-final}
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-tests sgmv decode}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/final.log
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
    tests)
      step "kernel tests" 200 $PY -m pytest -m gpu -q -p no:cacheprovider -rs -x \
        --confcutdir=tests/kernels tests/kernels
      step "engine gpu tests" 200 $PY -m pytest -m gpu -q -p no:cacheprovider -rs \
        --confcutdir=tests/engine tests/engine
      ;;
    sgmv)
      step "bench_sgmv" 240 $PY benchmarks/bench_sgmv.py --quick --tokens 1,32,64,128,256
      ;;
    decode)
      step "bench_decode" 200 $PY benchmarks/bench_decode.py --batches 1,8,32,64,128 \
        --modes base,one,distinct --steps 30 --compare-in-line --json "$OUT/decode.json" \
        --profile "$OUT" --host-profile "$OUT"
      ;;
    ops)
      step "bench_decode_ops" 150 $PY benchmarks/bench_decode_ops.py
      ;;
    sweep)
      step "sweep_decode_lora" 200 $PY benchmarks/sweep_decode_lora.py
      ;;
    variants)
      step "bench_sgmv --variants" 150 $PY benchmarks/bench_sgmv.py --variants \
        --tokens 32,64,128,256
      step "bench_sgmv --variants (metadata padded to 128 segments)" 100 $PY \
        benchmarks/bench_sgmv.py --variants --tokens 64,256 --slots 128
      step "sweep_decode_lora (batch 32, 32 distinct)" 150 $PY benchmarks/sweep_decode_lora.py
      step "sweep_decode_lora (batch 256, 32 Zipf adapters, 128 slots)" 200 $PY \
        benchmarks/sweep_decode_lora.py --batch 256 --adapters 32 --zipf 1.0 --slots 128 --profile
      ;;
    tuned)  # the warm-up's decode LoRA tuning against the rules (~4 min on an H100)
      step "tuned: batch 32, 32 distinct" 150 $PY benchmarks/sweep_decode_lora.py \
        --only "default|tuned"
      step "tuned: batch 256, 32 Zipf adapters, 128 slots" 150 $PY \
        benchmarks/sweep_decode_lora.py --batch 256 --adapters 32 --zipf 1.0 --slots 128 \
        --only "default|tuned"
      step "tuned: batch 128, 16 Zipf adapters, rank-64 pool" 150 $PY \
        benchmarks/sweep_decode_lora.py --batch 128 --adapters 16 --zipf 1.0 --slots 128 \
        --max-lora-rank 64 --only "default|tuned"
      ;;
    hf)
      step "bench_throughput (32 adapters + HF+PEFT)" 400 $PY benchmarks/bench_throughput.py \
        --adapters 0,32 --json "$OUT/throughput_hf.json"
      ;;
    tp_repeat)
      step "bench_throughput (0 and 32 adapters, alternating)" 300 $PY \
        benchmarks/bench_throughput.py --adapters 0,32,0,32,0,32 --hf-adapters "" \
        --json "$OUT/throughput_repeat.json"
      ;;
    throughput)
      step "bench_throughput" 560 $PY benchmarks/bench_throughput.py \
        --adapters 0,32,1,32i,0,512 --hf-adapters "" --json "$OUT/throughput.json" \
        --profile "$OUT"
      ;;
    *) echo "unknown section $s" | tee -a "$LOG" && status=1 ;;
  esac
done
echo "=== done rc=$status ($(date -u +%T))" | tee -a "$LOG"
exit $status
