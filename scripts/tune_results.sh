#!/usr/bin/env bash
# Issue #19's results: tune the equivariance defense on the validation split of the built-in classification and
# segmentation tasks, then evaluate vanilla, the paper's setting and the tuned setting once on test. Resumable: run
# it again after an interruption and finished candidates and shards are skipped. Results: .equi/results.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/prepare_data.py >/dev/null
for cfg in configs/tune/fashion_equivariance.yaml configs/tune/scenes_seg_equivariance.yaml; do
  echo "== tune $cfg ($(date -u +%H:%M:%S))"
  .venv/bin/equi tune "$cfg"
  test_cfg=$(.venv/bin/python scripts/evaluate_tuned.py "$cfg")
  echo "== test $test_cfg ($(date -u +%H:%M:%S))"
  .venv/bin/equi run "$test_cfg"
done
echo "== done ($(date -u +%H:%M:%S))"
