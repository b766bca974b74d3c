#!/usr/bin/env bash
# Issue #16 benchmark (one command): AutoAttack-grade attacks, per-image worst case, multi-draw scoring and 95%
# intervals on fashion_cnn, undefended (n=512) and with the equivariance defense (n=64). Prints each run's wall time
# and report. About 35-45 min on a 2-core CPU with nothing else running; re-running resumes (cached shards are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_LEVEL=WARNING
for config in configs/bench/verdicts_vanilla.yaml configs/bench/verdicts_equivariance.yaml; do
  start=$(date +%s)
  .venv/bin/equi run "$config" >/dev/null
  echo "wall: $config $(( $(date +%s) - start )) s"
  run_id=$(.venv/bin/python -c "from tasks.config import load_config; print(load_config('$config').run_id())")
  .venv/bin/equi report "$run_id"
done
