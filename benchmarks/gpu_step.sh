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
