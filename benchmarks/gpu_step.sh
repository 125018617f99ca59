# Sourced by the gpu_*.sh scripts (from the repo root): step NAME SECONDS CMD... runs CMD
# under a time limit, tees its output to $LOG and sets status=1 when it fails.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $* ($(date -u +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

# has NAME: whether NAME is one of the words of $SECTIONS.
has() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }

# banner: the GPU, its driver and clocks, and the torch/triton versions, into $LOG.
banner() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  } 2>&1 | tee -a "$LOG"
}
