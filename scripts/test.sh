#!/usr/bin/env bash
# README command 2: set up on a fresh machine, prepare the built-in data, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
.venv/bin/python scripts/prepare_data.py
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_LEVEL=WARNING
exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@"
