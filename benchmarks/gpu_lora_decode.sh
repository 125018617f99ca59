#!/usr/bin/env bash
# Issues 17/26: the LoRA expand's B loads (vector loads of each page's columns, where they were
# one element at a time) and the decode graphs' path choice, on one GPU, from anywhere:
#
#   OUT=/some/dir BASE=/a/checkout/of/the/tree/before bash benchmarks/gpu_lora_decode.sh
#
# tests: the GPU kernel tests (tests/kernels -m gpu);
# decode: benchmarks/bench_decode.py, dummy:llama3-8b bf16, batch 32 and 256 at context 320,
#   no adapter / 32 / 132 / all distinct rank-16 adapters, the pool's max rank 64 and 16, each
#   mix also with every LoRA graph on the segment kernels (--force-segment); with BASE, this
#   benchmark on that tree's package first (before / after in one run; without
#   --force-segment, which the old graphs lack); a kernel profile at batch 256, rank 64.
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
SECTIONS=${SECTIONS:-tests decode}
has tests && step "GPU kernel tests" 200 $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/kernels
DECODE=(--batches 32,256 --modes base,shared32,shared132,distinct --context 320 --rank 16
  --steps 20)
# BASE's package first on the path (this tree's "." left out), and this tree's benchmark run
# from BASE's benchmarks/ (its common.py puts the tree above it on sys.path)
BASEPATH=${BASE:-}:$(echo "$PYTHONPATH" | tr ':' '\n' | grep -vx '\.' | paste -sd:)
[ -n "${BASE:-}" ] && cp benchmarks/bench_decode.py benchmarks/common.py "$BASE/benchmarks/"
for r in 64 16; do
  if has decode && [ -n "${BASE:-}" ]; then
    step "before: bench_decode max_lora_rank $r" 150 env PYTHONPATH="$BASEPATH" \
      $PY "$BASE/benchmarks/bench_decode.py" "${DECODE[@]}" --max-lora-rank "$r" \
      --json "$OUT/decode_before_r$r.json"
  fi
  prof=()
  [ "$r" = 64 ] && prof=(--profile "$OUT/prof" --profile-batch 256)
  has decode && step "bench_decode max_lora_rank $r" 150 $PY benchmarks/bench_decode.py \
    "${DECODE[@]}" --force-segment --max-lora-rank "$r" --json "$OUT/decode_r$r.json" "${prof[@]}"
done
exit $status
