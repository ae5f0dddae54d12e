#!/usr/bin/env bash
# The GPU check in one command (under 8 minutes on one GPU): every script on CUDA in bf16 on
# small models built on the spot, padded == unpadded on the fused attention backends, a sampler
# step without host synchronisation, sampler ms/step and the peak memory of one CPT micro-batch
# at mmBERT-base shape. Exit status 0 only if every check passed. Details: benchmarks/gpu_check.py.
#
# Then, where CUDA is present, the roofline of the hot paths on the GPU (benchmarks/roofline.py),
# written as JSON to $ROOFLINE_JSON (default runs/roofline_cuda.json) for a CPU run's --compare.
#
#   bash benchmarks/gpu_check.sh                 # on cuda (the local rank's GPU)
#   bash benchmarks/gpu_check.sh --out /tmp/gc   # keep the runs it writes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
"$PYTHON" benchmarks/gpu_check.py --device cuda "$@" || status=$?
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PYTHON" benchmarks/roofline.py --device cuda --json "${ROOFLINE_JSON:-runs/roofline_cuda.json}" || status=1
fi
exit "$status"
