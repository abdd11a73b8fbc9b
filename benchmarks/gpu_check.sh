#!/usr/bin/env bash
# One-shot GPU check of the fastattr CUDA kernels, prepared for a lent GPU machine (nvidia-h200: torch
# 2.11+cu130 in python3, nvcc 13.0, pytest, ninja; no gymnasium, no network). Under 8 minutes in total:
#   1. environment: GPU, driver, nvcc, torch;
#   2. build fastattr._C in place with the CUDA kernels, against that machine's own torch, for sm_90 only (with the
#      system gcc when CXX has no shared libstdc++);
#   3. pytest -m cuda tests/test_cuda_ops.py (junit XML kept);
#   4. benchmarks/bench_ops.py (JSON lines kept);
#   5. only when STEPS names it, "profile": Nsight Compute on the pairwise kernel (ncu_pairwise_<dtype>.txt).
# Everything goes to $OUT (the device tool's return folder; default benchmarks/results/gpu_check):
#   gpu_check.log, pytest.xml, bench_ops.jsonl.
#
#   bash benchmarks/gpu_check.sh                     # build, test, bench
#   STEPS="build test" bash benchmarks/gpu_check.sh  # a subset (env always runs)
#   STEPS="build profile" bash benchmarks/gpu_check.sh  # the next tuning session's first look
#   BENCH_ARGS="--case pairwise" bash benchmarks/gpu_check.sh
# Exit status: 0 when every step passed, else the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build test bench}
export PYTHONUNBUFFERED=1 FASTATTR_STRICT=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, not an installed fastattr
exec > >(tee -a "$LOG") 2>&1

failed=0
t_start=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...: runs and times one step, never aborts the script
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== [$name] $(date -u +%H:%M:%S) (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== [$name] rc=$rc in $(($(date +%s) - t0))s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return "$rc"
}

echo "=== [env]"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
fi
"$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2 || echo "no nvcc under $CUDA_HOME"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"gpu {torch.cuda.is_available() and torch.cuda.get_device_name(0)}  "
      f"SMs {torch.cuda.is_available() and torch.cuda.get_device_properties(0).multi_processor_count}")
EOF

if [[ " $STEPS " == *" build "* ]]; then
  # The lent image sets CC/CXX to an /opt/gcc with libstdc++.a only: setup.py refuses it (a static libstdc++ beside
  # torch's crashed every error message with a number in it, 2026-11-29). Its system gcc links libstdc++ dynamically.
  cxx_so=$(${CXX:-g++} -print-file-name=libstdc++.so 2>/dev/null)
  if [[ "$cxx_so" != /* && -x /usr/bin/g++ ]]; then
    echo "CXX=${CXX:-g++} has no libstdc++.so: building with /usr/bin/gcc and /usr/bin/g++"
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
  fi
  # sm_90 only (the H200): one device pass per file keeps the build near a minute on 16 cores.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTATTR_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  rm -f fastattr/_C*.so
  step build 360 "$PY" setup.py build_ext --inplace
  step import 60 "$PY" - <<'EOF'
import torch
import fastattr
from fastattr import ops
missing = [op for op in ops.OPS if not ops.has_kernel(op, "cuda")]
print("cuda_version", ops.cuda_version(), "torch CUDA", torch.version.cuda, "missing CUDA kernels:", missing)
raise SystemExit(1 if missing or ops.cuda_version() < 0 else 0)
EOF
fi

if [[ " $STEPS " == *" test "* ]]; then
  extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
  # xdist workers: a test that crashes the interpreter fails alone and the rest still run (and in a third the time)
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
  step test 300 "$PY" -m pytest -m cuda tests/test_cuda_ops.py -q -rfs -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml" "${extra[@]}"
fi

if [[ " $STEPS " == *" bench "* ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  step bench 240 "$PY" benchmarks/bench_ops.py --out "$OUT" ${BENCH_ARGS:-}
fi

if [[ " $STEPS " == *" profile "* ]]; then
  # Nsight Compute on the pairwise kernel (the one furthest from its floor), one launch per dtype after warm-up:
  # occupancy, pipe and memory throughput, warp stalls. About 30 s per dtype; not in the default STEPS.
  for dtype in fp32 bf16; do
    step "profile-$dtype" 150 ncu --kernel-name regex:grad_sim_kernel --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section WarpStateStats --log-file "$OUT/ncu_pairwise_$dtype.txt" \
      "$PY" benchmarks/bench_ops.py --case pairwise --dtype "$dtype" --min-run-time 0.05 --out "$OUT/profile"
  done
fi

echo "=== gpu_check done in $(($(date +%s) - t_start))s, failed steps: $failed"
exit "$failed"
