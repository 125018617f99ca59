#!/usr/bin/env bash
# The open questions of the 2026-12-04 H200 runs, on one GPU, from anywhere (after
# `source benchmarks/device_setup.sh`, which installs the wheels the engine imports):
#
#   OUT=/some/dir SECTIONS="pin ttft" bash benchmarks/gpu_diagnose.sh        # ~7 min
#   OUT=/some/dir SECTIONS="scale" bash benchmarks/gpu_diagnose.sh           # ~8 min
#
# pin (issue #26): bench_adapter_scale.py's pin section: what a new pinned host buffer of one
#   adapter's bytes costs against a reused and a pageable one, and whether pinning in one
#   thread holds up kernel launches in another. The 2,000-adapter run held loads at ~9/s
#   whatever the worker count, with steps at 85 ms at a full batch (22.7 ms without adapters);
#   then that run again with the heap not frozen, as it ran then (the benchmarks now freeze
#   it after warm-up, as the engine server does: a full collection of a heap holding the model
#   and hundreds of loaded adapters is another suspect).
# ttft (issues #14, #21): bench_ttft.py on an idle engine (async and sync scheduling, a torch
#   profile of one 256-token first token) and beside a flood of 512: a lone 256-token request
#   spent 64 ms inside the engine for a few ms of GPU work, 215 ms beside the flood.
# scale (issue #26): the 2,000 all-seven-projection adapters host-cached (`used`: only those
#   the picks touch, so nothing loads during the run), from disk with the loader's pinned
#   buffers, and from disk with pageable ones (--host-pageable): which of the loads and the
#   adapter math makes the 85 ms steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex-gpu-diagnose}
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-pin ttft}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/diagnose.log
status=0
source benchmarks/gpu_step.sh  # step NAME SECONDS CMD..., has SECTION, banner
banner
has pin && step "pinned buffers" 120 $PY benchmarks/bench_adapter_scale.py --sections pin \
  --json "$OUT/pin.json"
has ttft && step "first token, idle" 180 $PY benchmarks/bench_ttft.py --sync \
  --profile "$OUT/prof" --json "$OUT/ttft.json"
has pin && step "2,000 adapters: disk, heap not frozen" 200 $PY \
  benchmarks/bench_adapter_scale.py --sections engine --settings all7 --adapters 2000 \
  --modes disk --heap default --busy-steps 100 --json "$OUT/scale_unfrozen.json"
has ttft && step "first token, beside 512" 180 $PY benchmarks/bench_ttft.py --load 512 \
  --prompt-lens 256 --reps 20 --json "$OUT/ttft_load.json"
has scale && step "2,000 adapters: used, disk" 300 $PY benchmarks/bench_adapter_scale.py \
  --sections engine --settings all7 --adapters 2000 --modes used,disk --busy-steps 100 \
  --json "$OUT/scale.json"
has scale && step "2,000 adapters: disk, pageable" 200 $PY benchmarks/bench_adapter_scale.py \
  --sections engine --settings all7 --adapters 2000 --modes disk --host-pageable \
  --busy-steps 100 --json "$OUT/scale_pageable.json"
exit $status
