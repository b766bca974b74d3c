#!/usr/bin/env bash
# Create .venv (Python 3.11) with torch/torchvision from this machine's disk and equirobust in editable mode.
# Idempotent: a second call only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# torch/torchvision pinned and installed first, by pip (which finds them on this machine's disk); letting a resolver
# pick torch would download several GB of CUDA wheels.
if ! "$VPY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1"
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi

stamp=.venv/.equirobust-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing equirobust and its dependencies"
  "$VPY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import equicore, storage, tasks, flows, reports, prefect, prefect_dask, zarr, duckdb, pycocotools" \
    || { echo "setup: installation incomplete" >&2; exit 1; }
  touch "$stamp"
fi
# torchattacks: the reference the tests hold APGD and Square to (a test dependency, never imported by the package).
# --no-deps: it pins requests~=2.25, which would downgrade what prefect needs; scipy and tqdm come with the project.
if ! "$VPY" -c "import torchattacks" 2>/dev/null; then
  echo "setup: installing torchattacks==3.5.1 (test reference)"
  "$VPY" -m pip install -q --no-deps torchattacks==3.5.1 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "setup: ok ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
