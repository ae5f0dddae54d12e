#!/usr/bin/env bash
# The GPU check in one command (under 8 minutes on one GPU): every script on CUDA in bf16 on
# small models built on the spot, padded == unpadded on the fused attention backends, a sampler
# step without host synchronisation, sampler ms/step and the peak memory of one CPT micro-batch
# at mmBERT-base shape. Exit status 0 only if every check passed. Details: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                 # on cuda (the local rank's GPU)
#   bash benchmarks/gpu_check.sh --out /tmp/gc   # keep the runs it writes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/gpu_check.py --device cuda "$@"
