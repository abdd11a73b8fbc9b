#!/usr/bin/env bash
# Reproduce the paper's six benchmarks: 5 seeds x {ppo, iif, random} at the paper's settings (`--preset paper`),
# JOBS training processes at a time (default 1; each runs on one thread, so JOBS=2 fills two cores), in
# $OUT/<env>/ (runs/ is gitignored). Resumable: run it again to continue; finished runs are skipped and a killed
# run resumes from its last round, bit-identically.
#
#   mkdir -p runs/repro && JOBS=2 nohup setsid benchmarks/repro.sh >> runs/repro/repro.log 2>&1 &
#
# highway: highway-fast-v0 stands in for highway-v0 (~23 env steps/s here, ~2.5 h per run; fast: ~100/s).
# Each env's summary (SE_ave, SE_peak, RT_peak, final-return gain) lands in $OUT/<env>/summary.{md,json}.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/repro}
SEEDS=${SEEDS:-0-4}
METHODS=${METHODS:-ppo,iif,random}
JOBS=${JOBS:-1}
ENVS=${ENVS:-FrozenLake-v1 Acrobot-v1 MiniGrid-Empty-8x8-v0 LunarLander-v3 BipedalWalker-v3 highway-fast-v0}
mkdir -p "$OUT"
for env in $ENVS; do
  echo "=== $(date '+%F %T') $env"
  "$PY" -m fastattr compare --env-id "$env" --preset paper --seeds "$SEEDS" --methods "$METHODS" \
    --out "$OUT/$env" --jobs "$JOBS" || echo "=== $env: some runs failed (see $OUT/$env/logs)"
done
echo "=== $(date '+%F %T') done"
