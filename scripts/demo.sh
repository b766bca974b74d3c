#!/usr/bin/env bash
# README command 1: set up on a fresh machine, prepare the built-in data, run the demo benchmark through the full
# pipeline (local Dask cluster, Zarr cache, Parquet results) and print the reports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/equi demo "$@"
