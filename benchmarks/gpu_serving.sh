#!/usr/bin/env bash
# Issue #14 on a CUDA machine, from the repo root, in device-call-sized sections:
#
#   SECTIONS="tests throughput" bash benchmarks/gpu_serving.sh
#   SECTIONS="serving" bash benchmarks/gpu_serving.sh
#   OUT=$OUT SECTIONS=fairness FAIR_LIMIT=500 bash benchmarks/gpu_serving.sh
#
# setup (always): the gateway's packages from .whl/ (carried; see docs/benchmarks.md) into
#   /tmp/site, unless there already;
# tests: the engine's gpu-marked tests (graphs, async scheduling, the 8B smoke);
# throughput: the offline engine, async and synchronous steps, 0 and 32 adapters, with the
#   GPU-busy window;
# serving: bench_serving.py, the offline baseline then loraplex serve over HTTP: closed loop
#   of 256 streams, Poisson at 21.6 req/s and a rate sweep.
# fairness: bench_serving.py --fairness (issue #21: a light tenant beside a flood, 3:1
#   weights, the throughput cost of fairness over one-key / two-key pairs) under FAIR_LIMIT
#   seconds (540; set it under the device call's limit);
# profile: Poisson at 21.6 req/s only (the offline replay of both request shapes first),
#   the whole run under py-spy (a wheel of .whl/); benchmarks/pyspy_summary.py's view of the
#   engine process in $OUT/profile.txt (PROFILE_ARGS= replaces the benchmark's arguments).
# Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/loraplex-gpu-serving}
SECTIONS=${SECTIONS:-tests throughput serving}
RATES=${RATES:-21.6,30,40,50}
mkdir -p "$OUT"
if [ ! -f /tmp/site/.done ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The server's data directory (object store, disk cache, spooled uploads) in memory when
# /dev/shm has room (16 GiB): uploading 32 adapters (2.7 GB, written twice) took 186 s on the
# device's disk, 10 % of a session's device time, and what is timed never reads it (the
# warm-up makes every adapter resident first). TMPDIR set by the caller wins.
shm_kib=$(df -k --output=avail /dev/shm 2>/dev/null | tail -n 1)
if [ -z "${TMPDIR:-}" ] && [ "${shm_kib:-0}" -gt $((16 * 1024 * 1024)) ] 2>/dev/null; then
  export TMPDIR=/dev/shm
fi
echo "temporary files under ${TMPDIR:-/tmp}"
python3 -c "import loraplex.gateway.worker, loraplex.engine.remote_client, loraplex.main" || exit 1
status=0
step() {  # step NAME CMD...: run, log, remember failure
  local name=$1
  shift
  echo "=== $name ($(date -u +%T))"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}
for s in $SECTIONS; do
  case $s in
    tests)
      step gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider -x \
        --confcutdir=tests/engine tests/engine/test_model_runner_gpu.py \
        tests/engine/test_gpu_llama3_8b.py ;;
    throughput)
      step throughput python3 benchmarks/bench_throughput.py \
        --adapters "${CASES:-0,0s,32,32s,32s,32,0s,0}" --busy-steps "${BUSY_STEPS:--1}" \
        --hf-adapters "" --json "$OUT/throughput.json" ;;
    serving)
      step serving python3 benchmarks/bench_serving.py --baseline --concurrency 256 \
        --rates "$RATES" --workers "${WORKERS:-6}" --client-procs "${CLIENT_PROCS:-4}" \
        --json "$OUT/serving.json" ;;
    fairness)  # issue #21 (~250 s on an H100): every run's result reaches fairness.json as
      # it ends, so a call cut short by its time limit keeps what finished
      step fairness timeout "${FAIR_LIMIT:-540}" python3 benchmarks/bench_serving.py \
        --fairness --adapters 8 --tenants 4 --workers 4 --client-procs 8 \
        --fair-cost-repeats "${FAIR_REPEATS:-3}" --json "$OUT/fairness.json" ;;
    profile)
      step profile /tmp/site/bin/py-spy record --nonblocking --subprocesses --threads --idle \
        -r 50 -f raw -o /tmp/serving-prof.txt -- python3 benchmarks/bench_serving.py \
        ${PROFILE_ARGS:---baseline --replay both --concurrency 0 --rates 21.6 --workers 6 \
        --client-procs 4 --json $OUT/profile.json}
      python3 benchmarks/pyspy_summary.py /tmp/serving-prof.txt \
        --process "loraplex.main engine" > "$OUT/profile.txt" 2>&1
      head -n 60 "$OUT/profile.txt" ;;
  esac
done
exit $status
