#!/usr/bin/env bash
# The GPU validation + engine benchmarks in one go, on a CUDA machine, from the repo root:
#
#   bash benchmarks/gpu_suite.sh [full|quick]      (SECTIONS="tests decode throughput profile")
#
# 1. the gpu-marked tests of tests/kernels and tests/engine (one pytest run per package, with
#    conftest lookup cut at the package: tests/conftest.py needs the database harness, which
#    a bare GPU box lacks and these tests do not use);
# 2. benchmarks/bench_decode.py;  3. benchmarks/bench_throughput.py (with the HF+PEFT baseline);
# 4. profiles (torch.profiler of decode steps, cProfile of the engine's step loop).
# Logs and JSON go to $OUT (default /tmp/loraplex-gpu-suite); the exit status is non-zero if
# any step failed, but every step runs.
# On an H100 the full suite takes ~10 min (tests ~2, decode ~1, throughput ~6 of which the
# 512-adapter preload ~1.5 and HF+PEFT ~2): past one 10-minute device call, so split it with
# SECTIONS across calls, or use `quick`.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-/tmp/loraplex-gpu-suite}
SECTIONS=${SECTIONS:-tests decode throughput}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
step() {  # step NAME LOGFILE CMD...: run, tee, remember failure
  local name=$1 log=$2
  shift 2
  echo "=== $name: $* ($(date -u +%T))" | tee -a "$OUT/$log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/$log"
  [ "$rc" -eq 0 ] || status=1
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  nproc
} 2>&1 | tee -a "$OUT/pytest.log"  # at most 8 files come back from the device: no env file

if [ "$MODE" = quick ]; then
  DECODE_ARGS=(--batches 1,32 --steps 10)
  TP_ARGS=(--num-requests 200 --adapters 0,32 --hf-requests 8 --hf-batch 8)
else
  DECODE_ARGS=()
  TP_ARGS=()
fi
PROFILE_DIR=()
case " $SECTIONS " in *" profile "*) PROFILE_DIR=(--profile "$OUT") ;; esac

for s in $SECTIONS; do
  case $s in
    tests)
      step "kernel tests" pytest.log $PY -m pytest -m gpu -q -p no:cacheprovider -rs \
        --confcutdir=tests/kernels tests/kernels
      step "engine gpu tests" pytest.log $PY -m pytest -m gpu -q -p no:cacheprovider -rs -s \
        --confcutdir=tests/engine tests/engine
      ;;
    decode)
      step "bench_decode" bench_decode.log $PY benchmarks/bench_decode.py \
        --json "$OUT/decode.json" "${DECODE_ARGS[@]}" "${PROFILE_DIR[@]}"
      ;;
    throughput)
      step "bench_throughput" bench_throughput.log $PY benchmarks/bench_throughput.py \
        --json "$OUT/throughput.json" "${TP_ARGS[@]}" "${PROFILE_DIR[@]}"
      ;;
    profile) ;;  # handled by --profile on the benchmarks above
    *) echo "unknown section $s" && status=1 ;;
  esac
done
exit $status
