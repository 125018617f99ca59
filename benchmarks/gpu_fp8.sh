#!/usr/bin/env bash
# Issue 17 (FP8 base weights, kernel configs per GPU model) on one GPU, in one device call
# of under 8 minutes, from anywhere:
#
#   OUT=/some/dir bash benchmarks/gpu_fp8.sh
#
# 1. the FP8 kernel tests on the GPU (W8A16 at Llama-3-8B shapes, W8A8, row quantization,
#    graph replay, and the small-shape ones), the launch-config table tests, and the SGMV
#    tests of mixed ranks on the per-token path (the rank-bucketed shrink);
# 2. benchmarks/bench_fp8.py: the kernel-config sweep (in the FP8 runner's warm-up), GEMMs of
#    Llama-3-8B at M 1-256 (bf16 / weight-only FP8 / W8A8 / _scaled_mm alone vs the 1- and
#    2-byte floors), decode at batch 32 with 32 distinct rank-16 adapters bf16 vs FP8, prefill
#    tokens/s, greedy agreement and KL (QUALITY_MODEL=<HF dir | .gguf | default> for real
#    weights, e.g. QUALITY_MODEL=default PROMPTS=200; else on MODEL, default dummy:llama3-8b,
#    random weights) -> $OUT/fp8.json;
# 3. benchmarks/bench_sgmv.py --rank-split: mixed ranks 8-64, the rank-bucketed per-token
#    shrink against one tile shape for all ranks;
# 4. the gpu-marked FP8 runner tests (CUDA graphs + adapters vs dequantized bf16, the
#    config cache file written and read back).
# SECTIONS="tests bench sgmv runner" (the default) picks steps. Each step runs under a time
# limit; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-fp8}
PY=${PYTHON:-python3}
MODEL=${MODEL:-dummy:llama3-8b}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/fp8.log
status=0
source benchmarks/gpu_step.sh  # step NAME SECONDS CMD..., has SECTION, banner
banner
SECTIONS=${SECTIONS:-tests bench sgmv runner}
has tests && step "fp8 kernel tests" 100 $PY -m pytest -q -p no:cacheprovider -rs \
  --confcutdir=tests/kernels tests/kernels/test_fp8_linear.py tests/kernels/test_tuning.py \
  tests/kernels/test_lora_sgmv.py -k "fp8 or tuning or rank_buckets or hidden_2049"
QUALITY=()
[ -n "${QUALITY_MODEL:-}" ] && QUALITY=(--quality-model "$QUALITY_MODEL")
has bench && step "bench_fp8" 280 $PY benchmarks/bench_fp8.py --model "$MODEL" \
  --json "$OUT/fp8.json" --kernel-config-dir "$OUT/kernel-configs" ${QUALITY[@]+"${QUALITY[@]}"} \
  --prompts "${PROMPTS:-64}"
has sgmv && step "bench_sgmv rank split" 40 $PY benchmarks/bench_sgmv.py --rank-split \
  --tokens 16,64
left=$((470 - SECONDS))
has runner && step "fp8 runner tests" $((left > 30 ? left : 30)) $PY -m pytest -m gpu -q \
  -p no:cacheprovider -rs --confcutdir=tests/engine tests/engine/test_fp8_model.py
exit $status
