#!/usr/bin/env bash
# Tensor parallelism on the GPU box, in one 10-minute device call:
#
#   OUT=/some/dir bash benchmarks/gpu_tp_check.sh [BASELINE_TREE]
#
# 1. TP size 1 speed: benchmarks/bench_decode.py (dummy:llama3-8b, bf16, CUDA graphs; batch
#    1/32/128, base and distinct adapters) on this tree and, given BASELINE_TREE (a copy of
#    main's tree), on that one, interleaved twice; a table of gpu_ms and step_ms per case,
#    this tree over the baseline (1.00 = unchanged).
# 2. With 2+ GPUs: benchmarks/check_tp_gpu.py (NCCL, graphs per rank: TP 2 == TP 1 tokens and
#    logits in fp32, decode times, a killed rank raises RunnerFailed).
# Exit status non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-tp}
PY=${PYTHON:-python3}
BASE=${1:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
ARGS=(--batches "${BATCHES:-1,32,128}" --modes base,distinct --steps 50)
bench() {  # bench NAME TREE
  echo "=== bench_decode $1 ($(date -u +%T))"
  (cd "$2" && PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. timeout 170 "$PY" benchmarks/bench_decode.py "${ARGS[@]}" \
    --json "$OUT/$1.json") >"$OUT/$1.log" 2>&1 || { echo "$1 failed"; tail -20 "$OUT/$1.log"; status=1; }
}
for i in 1 2; do
  bench "branch-$i" .
  [ -n "$BASE" ] && bench "main-$i" "$BASE"
done
"$PY" - "$OUT" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
def load(prefix):
    runs = [json.loads(p.read_text())["rows"] for p in sorted(out.glob(f"{prefix}-*.json"))]
    cases = {}
    for rows in runs:
        for r in rows:
            cases.setdefault((r["batch"], r["mode"]), []).append(r)
    return {k: {m: statistics.median(x[m] for x in v) for m in ("gpu_ms", "step_ms")}
            for k, v in cases.items()}
b, m = load("branch"), load("main")
print(f"{'batch':>5} {'mode':>9} {'gpu_ms':>8} {'step_ms':>8}" + ("  gpu/main step/main" if m else ""))
for k in sorted(b):
    line = f"{k[0]:>5} {k[1]:>9} {b[k]['gpu_ms']:8.3f} {b[k]['step_ms']:8.3f}"
    if k in m:
        line += f"  {b[k]['gpu_ms'] / m[k]['gpu_ms']:8.3f} {b[k]['step_ms'] / m[k]['step_ms']:9.3f}"
    print(line)
PY
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  echo "=== check_tp_gpu ($(date -u +%T))"
  PYTHONPATH=. timeout 240 "$PY" benchmarks/check_tp_gpu.py --json "$OUT/tp2.json" \
    >"$OUT/tp2.log" 2>&1 || status=1
  tail -5 "$OUT/tp2.log"
fi
exit $status
