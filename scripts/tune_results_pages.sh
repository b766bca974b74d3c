#!/usr/bin/env bash
# After scripts/tune_results.sh: the pages docs/TUNING.md quotes for issue #19 (the search's table and plot, the
# test run's tables), then docs/TUNING.md (and docs/RESULTS.md) from their templates.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in tune-fashion-equivariance tune-scenes-seg-equivariance; do
  folder=.equi/results/tune/$name
  .venv/bin/python scripts/tune_front_page.py "$folder" docs/tuning
  cp "$folder/front.png" "docs/tuning/$name-front.png"
  run_id=$(.venv/bin/python -c "import sys; from tasks.config import load_config; print(load_config(sys.argv[1]).run_id())" "$folder/$name-test.yaml")
  .venv/bin/equi report "$run_id" --out docs/tuning
done
.venv/bin/python scripts/render_results.py
