#!/usr/bin/env bash
# One H100 call (~5 min, at most ~7): the gpu-marked kernel tests, then the SGMV and decode
# benchmarks on the cases the per-token SGMV fix is about (batch 1/32/128; base, one adapter
# for the whole batch, N distinct adapters; metadata padded to 128 slots as in the decode
# graphs), then a short summary table against the numbers in docs/benchmarks.md.
#
#   OUT=/some/dir bash benchmarks/gpu_final.sh        (from anywhere; default OUT below)
#
# Files in $OUT: final.log (everything), sgmv.log, decode.json, decode_profile.txt,
# summary.txt. The exit status is non-zero if any step failed; every step runs (each under
# its own time limit, so that one slow step cannot eat the others' time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-final}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/final.log
status=0
step() {  # step NAME SECONDS CMD...: run under a time limit, tee, remember failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* ($(date -u +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee -a "$LOG"

step "kernel tests" 180 $PY -m pytest -m gpu -q -p no:cacheprovider -rs \
  --confcutdir=tests/kernels tests/kernels
# SGMV per layer (7 Llama-3-8B projections): one rank-16 adapter, all distinct r16, distinct
# r8-64; metadata padded to 128 segments like the decode graphs on 128 slots
step "bench_sgmv" 90 $PY benchmarks/bench_sgmv.py --quick --tokens 1,32,128 --slots 128
grep '^| ' "$LOG" | tail -n 11 >"$OUT/sgmv.log"
# decode steps of dummy:llama3-8b through the runner's CUDA graphs, 128 LoRA slots
step "bench_decode" 150 $PY benchmarks/bench_decode.py --batches 1,32,128 \
  --modes base,one,distinct --steps 20 --json "$OUT/decode.json" --profile "$OUT"

$PY - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
# docs/benchmarks.md "Decode step" (14:51 UTC, before the per-token SGMV fix): gpu ms
before = {
    (1, "base"): 6.40, (1, "one"): 8.63, (1, "distinct"): 8.63,
    (32, "base"): 7.14, (32, "one"): 23.28, (32, "distinct"): 10.21,
    (128, "base"): 9.75, (128, "one"): 33.56, (128, "distinct"): 15.36,
}
print("\n==== SUMMARY")
sgmv = (out / "sgmv.log").read_text() if (out / "sgmv.log").exists() else ""
print("SGMV per layer, metadata padded to 128 segments (us):")
print(sgmv or "  (no bench_sgmv table: see final.log)")
f = out / "decode.json"
if not f.exists():
    print("no decode.json: see final.log")
    sys.exit(0)
rows = json.loads(f.read_text())["rows"]
print("Decode step, dummy:llama3-8b bf16, context 512, 128 slots (ms):")
print("| batch | mix | adapters | floor | gpu | gpu/floor | step | step/base | gpu before |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    b4 = before.get((r["batch"], r["mode"]))
    print(
        f"| {r['batch']} | {r['mode']} | {r['adapters']} | {r['floor_ms']:.2f} | "
        f"{r['gpu_ms']:.2f} | {r['gpu/floor']:.2f} | {r['step_ms']:.2f} | "
        f"{r.get('step/base', float('nan')):.2f} | {b4 if b4 is not None else '-'} |"
    )
prof = out / "decode_profile.txt"
if prof.exists():  # the LoRA kernels of the batch-32 profiles: us per step, calls, mean us
    for part in prof.read_text().split("==== ")[1:]:
        print("profile", part.splitlines()[0], "- LoRA kernels (us/step, calls/step, mean us):")
        tail = part.split("kernel (name, grid)")[-1].splitlines()[1:]
        for line in [x for x in tail if "gmv" in x][:8]:
            print("  " + line.strip())
EOF
echo "=== done rc=$status ($(date -u +%T))" | tee -a "$LOG"
exit $status
