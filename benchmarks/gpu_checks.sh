#!/usr/bin/env bash
# What a lent GPU machine runs for bndoctor, in one call (issue #18): the CUDA tests and the step-time
# benchmarks on CUDA. Each step has its own time limit, so one that fails or hangs does not cost the rest.
# The tables land in $OUT/BENCHMARKS.md (a copy of ours with CUDA sections added) and in $OUT/*.txt (eight files in
# all, as many as the device tool brings back: the machine's description heads steps.txt).
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh                 # on a machine with a GPU
#   DEVICE=cpu ROUNDS=1 OUT=/tmp/smoke bash benchmarks/gpu_checks.sh   # the same steps on the CPU, to try it
#   STEPS="tests accum" bash benchmarks/gpu_checks.sh                 # some of the steps
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bndoctor-gpu}
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-7}
PY=${PYTHON:-python3}
STEPS=${STEPS:-tests paths accum monitor sync compile}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/steps.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step paths 45 "$PY" benchmarks/bench_paths.py --device "$DEVICE" --rounds "$ROUNDS" --update "$OUT/BENCHMARKS.md"
step accum 100 "$PY" benchmarks/bench_accum.py --device "$DEVICE" --rounds "$ROUNDS" --update "$OUT/BENCHMARKS.md"
step monitor 60 "$PY" benchmarks/bench_monitor.py --device "$DEVICE" --rounds "$ROUNDS" --update "$OUT/BENCHMARKS.md"
step sync 90 "$PY" benchmarks/bench_sync.py --device "$DEVICE" --rounds "$ROUNDS" --steps 20 --update "$OUT/BENCHMARKS.md"
step compile 200 "$PY" benchmarks/bench_compile.py --device "$DEVICE" --rounds "$ROUNDS" --update "$OUT/BENCHMARKS.md"
cat "$OUT/steps.txt" 2>/dev/null
