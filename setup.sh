#!/usr/bin/env bash
# Create .venv and install minidiff with its test extras. On a CPU-only machine the pinned CPU
# build of torch is installed first, so pip does not pull several GB of CUDA wheels; on a GPU
# machine set TORCH_REQUIREMENT (e.g. TORCH_REQUIREMENT="torch" or a CUDA build) before running this.
# Everything else is held to the versions in constraints.txt (the ones the tests were checked
# with; the README says which versions each measurement used).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_REQUIREMENT"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,data,harness]"
