#!/usr/bin/env bash
# Every family of issue 18 on one H200, in one device call (<= ~8.5 min), from anywhere:
#
#   OUT=/some/dir bash benchmarks/gpu_families.sh
#
# In order of importance (a step starts only while the budget leaves it its minimum; the
# rest are listed as skipped, to run in a second call with STEPS="name ..."):
#   families    tests/engine/test_gpu_families.py: Qwen3, Mistral-Nemo, Phi-4-mini at the
#               presets' layer shapes, bf16 + CUDA graphs vs HF + PEFT float32
#   gemma       tests/engine/test_gpu_gemma.py (Gemma 2 / 3, real shapes and windows)
#   moe         tests/engine/test_gpu_moe.py (Qwen3-MoE at Qwen3-30B-A3B's layer shapes)
#   moe-kernels tests/kernels/test_fused_moe.py (fused-MoE and expert-LoRA kernels)
#   tp-moe, tp-gemma3, tp-gemma2, tp-qwen3, tp-nemo, tp-phi4
#               benchmarks/bench_throughput.py on dummy:qwen3-30b-a3b, dummy:gemma3-12b,
#               dummy:gemma2-9b, dummy:qwen3-8b, dummy:mistral-nemo-12b, dummy:phi4-mini:
#               no adapters vs 32 (Zipf 1.0), HF skipped, NUM_REQUESTS (400) requests of
#               256 + 128 tokens; the MoE one rank 8 on attention and every expert, as
#               benchmarks/gpu_moe.sh runs it. Each prints its 32-vs-0 ratio.
# Logs: $OUT/run.log (all) and $OUT/<step>.log; JSON: $OUT/throughput_<preset>.json;
# the summary table: $OUT/summary.txt. Exit status 1 if any step failed or was skipped.
#
# BUDGET (510 s) is the whole run's time; STEPS picks steps; SMOKE=1 checks the script on a
# CPU machine: the tests are only collected and every bench step runs dummy:tiny (the MoE one
# dummy:tiny-moe) with the same flags and a handful of requests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-families}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-510}
SMOKE=${SMOKE:-0}
NUM_REQUESTS=${NUM_REQUESTS:-400}
ALL="families gemma moe moe-kernels tp-moe tp-gemma3 tp-gemma2 tp-qwen3 tp-nemo tp-phi4"
STEPS=${STEPS:-$ALL}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/run.log
SUMMARY=$OUT/summary.tsv
: >"$SUMMARY"
START=$SECONDS
status=0

# step NAME LIMIT MIN KIND CMD...: run under min(LIMIT, what the budget leaves) seconds when
# the budget leaves at least MIN; tee to the logs; a summary row either way
step() {
  local name=$1 limit=$2 min=$3 kind=$4
  shift 4
  local left=$((BUDGET - (SECONDS - START) - 10))  # 10 s for the summary
  if [ "$left" -lt "$min" ]; then
    echo "=== $name: skipped, ${left}s of the budget left (needs ${min}s)" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "-" "skipped" 0 "needs ${min}s, ${left}s left" >>"$SUMMARY"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $* ($(date -u +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} took=$((SECONDS - t0)) state=ok note=""
  [ "$rc" -eq 0 ] || { state=FAILED; status=1; }
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && state=TIMEOUT
  if [ "$kind" = test ]; then
    note=$(grep -E '[0-9]+ (passed|failed|error|skipped)|no tests ran|tests? collected' \
      "$OUT/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  else
    note=$($PY - "$OUT/throughput_${name#tp-}.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["engine"]
except (OSError, ValueError, KeyError):
    sys.exit(print("no JSON"))
tok = {r["adapters"]: r["out_tok_s"] for r in rows}
if 0 in tok and 32 in tok:
    print(f"0: {tok[0]:.0f} tok/s, 32: {tok[32]:.0f} tok/s, 32 vs 0: {tok[32] / tok[0]:.3f}x")
else:
    print("cases done: " + ", ".join(f"{n}: {t:.0f} tok/s" for n, t in tok.items()))
EOF
)
    echo "=== $name: $note" | tee -a "$LOG"
  fi
  echo "=== $name: rc=$rc in ${took}s" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$state" "$took" "$note" >>"$SUMMARY"
}

pytest_step() {  # pytest_step NAME LIMIT MIN DIR ARGS...
  local name=$1 limit=$2 min=$3 dir=$4
  shift 4
  local args=(-q -s -p no:cacheprovider -rs "--confcutdir=$dir")
  [ "$SMOKE" = 1 ] && args+=(--collect-only)
  step "$name" "$limit" "$min" test $PY -m pytest "${args[@]}" "$@"
}

bench_step() {  # bench_step NAME LIMIT MIN PRESET ARGS...
  local name=$1 limit=$2 min=$3 preset=$4
  shift 4
  local size=(--num-requests "$NUM_REQUESTS" --prompt-len 256 --output-len 128)
  if [ "$SMOKE" = 1 ]; then
    case $preset in *a3b) preset=tiny-moe ;; *) preset=tiny ;; esac
    size=(--num-requests 8 --prompt-len 16 --output-len 4 --max-num-seqs 8)
  fi
  step "$name" "$limit" "$min" bench $PY benchmarks/bench_throughput.py \
    --model "dummy:$preset" --adapters 0,32 --hf-adapters "" "${size[@]}" "$@" \
    --json "$OUT/throughput_${name#tp-}.json"
}

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo "no nvidia-smi"
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  echo "steps: $STEPS; budget ${BUDGET}s; smoke=$SMOKE"
} 2>&1 | tee -a "$LOG"

for s in $STEPS; do
  case $s in
    families) pytest_step families 200 60 tests/engine -m gpu tests/engine/test_gpu_families.py ;;
    gemma) pytest_step gemma 180 60 tests/engine -m gpu tests/engine/test_gpu_gemma.py ;;
    moe) pytest_step moe 150 50 tests/engine -m gpu tests/engine/test_gpu_moe.py ;;
    moe-kernels) pytest_step moe-kernels 100 30 tests/kernels tests/kernels/test_fused_moe.py ;;
    tp-moe)
      bench_step tp-moe 200 100 qwen3-30b-a3b --rank 8 --weight-files 4 \
        --lora-memory-fraction 0.6 --host-lora-memory-fraction 0.4
      ;;
    tp-gemma3) bench_step tp-gemma3 100 60 gemma3-12b ;;
    tp-gemma2) bench_step tp-gemma2 100 60 gemma2-9b ;;
    tp-qwen3) bench_step tp-qwen3 90 50 qwen3-8b ;;
    tp-nemo) bench_step tp-nemo 100 60 mistral-nemo-12b ;;
    tp-phi4) bench_step tp-phi4 90 50 phi4-mini ;;
    *)
      echo "unknown step $s (steps: $ALL)" | tee -a "$LOG"
      printf '%s\t-\tunknown\t0\tnot a step\n' "$s" >>"$SUMMARY"
      status=1
      ;;
  esac
done

{
  echo
  echo "summary ($((SECONDS - START))s of ${BUDGET}s, $(date -u +%T)):"
  printf '%-12s %-4s %-8s %5s  %s\n' step rc state secs result
  while IFS=$'\t' read -r name rc state took note; do
    printf '%-12s %-4s %-8s %5s  %s\n' "$name" "$rc" "$state" "$took" "$note"
  done <"$SUMMARY"
  echo "=== done rc=$status"
} | tee "$OUT/summary.txt" | tee -a "$LOG"
exit $status
