#!/usr/bin/env bash
# Create .venv and install minidiff with its test extras. On a CPU-only machine the pinned CPU
# build of torch is installed first, so pip does not pull several GB of CUDA wheels; on a GPU
# machine set TORCH_SPEC (e.g. TORCH_SPEC="torch" or a CUDA build) before running this.
# Everything else is held to the versions in constraints.txt (the ones the tests and the
# README's numbers were checked with).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,data,harness]"
