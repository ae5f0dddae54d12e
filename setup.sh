#!/usr/bin/env bash
# Create a venv (.venv) and install minidiff with its test extras.
#
# torch comes first, pinned, so that pip resolves nothing larger behind it. From the public index
# on Linux `torch==2.13.0` is the CUDA build (several GB of CUDA libraries); on macOS and Windows
# it is the CPU build. Variables choose otherwise:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./setup.sh     # the CPU build on Linux
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./setup.sh   # a given CUDA build
#   TORCH_REQUIREMENT="torch==2.13.0" (the default) or another version or wheel
#   PYTHON=python3.12 (the venv's interpreter, 3.10 to 3.13), VENV=.venv-gpu (its folder),
#   EXTRAS=test (minidiff's extras; default dev,data,harness,serve)
# Everything else is held to the versions in constraints.txt (the ones the tests were checked with).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_REQUIREMENT=${TORCH_REQUIREMENT:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT"
else
  "${PIP[@]}" "$TORCH_REQUIREMENT"
fi
"${PIP[@]}" -c constraints.txt -e ".[${EXTRAS:-dev,data,harness,serve}]"
