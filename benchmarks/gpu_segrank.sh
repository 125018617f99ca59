#!/usr/bin/env bash
# Issues 17/26: the segment path (prefill / mixed steps) sized by the step's largest rank
# instead of the pool's max rank, on one GPU, from anywhere:
#
#   OUT=/some/dir bash benchmarks/gpu_segrank.sh                       # tests + sgmv, ~5 min
#   OUT=/some/dir SECTIONS=throughput bash benchmarks/gpu_segrank.sh   # ~8 min
#
# tests: the SGMV segment-path rank tests on the GPU (ranks 8/16/32 in a rank-64 pool, mixed
#   8-64, the partials' width) and the rank-bucketed per-token ones;
# sgmv: benchmarks/bench_sgmv.py --seg-rank: one Llama-3-8B layer (4 groups, shrink + expand)
#   at 64/256/1024/2048 prefill tokens over 1/8/32 rank-16 adapters and 32 of mixed ranks
#   (8-32, 8-64) in a max-rank-64 pool; per variant us per layer and new/old in the same run,
#   the bytes floor and the partials' MiB old -> new;
# throughput: benchmarks/bench_throughput.py (dummy:llama3-8b bf16, 1000 requests 256/128,
#   32 rank-16 adapters vs none) at max_lora_rank 64 and 16: the 32-adapter/no-adapter ratio
#   at 64 should close on the one at 16 (before: 0.685 vs 0.826).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-segrank}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/segrank.log
status=0
source benchmarks/gpu_step.sh  # step NAME SECONDS CMD..., has SECTION, banner
banner
SECTIONS=${SECTIONS:-tests sgmv}
has tests && step "segment rank tests" 90 $PY -m pytest -q -p no:cacheprovider -rs \
  --confcutdir=tests/kernels tests/kernels/test_lora_sgmv.py \
  -k "segment or seg_rank or step_rank or rank_buckets or paged_layouts"
has sgmv && step "bench_sgmv --seg-rank" 420 $PY benchmarks/bench_sgmv.py --seg-rank \
  --tokens 64,256,1024,2048 --pool-rank 64
for r in 64 16; do
  has throughput && step "bench_throughput max_lora_rank $r" 240 $PY \
    benchmarks/bench_throughput.py --adapters 0,32 --hf-adapters '' --max-lora-rank "$r" \
    --json "$OUT/throughput_r$r.json"
done
exit $status
