#!/usr/bin/env bash
# The first run on a new GPU, in stages; each prints its result as it ends, so a run cut short
# still says what passed (details: benchmarks/gpu_check.py, docs/devices.md).
#
#   1. preflight  CUDA, driver >= torch's CUDA runtime, a C compiler and Python's headers for
#                 Triton, free memory (seconds)
#   2. check      every script on CUDA, padded == unpadded on the fused backends, no host sync in a
#                 sampler step and peak memory at mmBERT-base shape, the compiled sampler on a tiny
#                 model (compiler caches reset, graphs counted): bounded, under 5 minutes on one GPU
#   3. timings    opt-in (--timings): the sampler's ms/step at full shape per cache mode, eager and
#                 compiled, then the roofline of the hot paths (JSON to $ROOFLINE_JSON)
#
#   bash benchmarks/gpu_check.sh                 # stages 1 and 2 on cuda
#   bash benchmarks/gpu_check.sh --timings       # and stage 3
#   bash benchmarks/gpu_check.sh --out /tmp/gc   # keep the runs it writes
#
# Without .venv it makes one with only what the check needs: torch (from pip's index: the CUDA
# build on Linux) and minidiff's runtime dependencies, no test or harness extras.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/python -m pip install -q "${TORCH_REQUIREMENT:-torch==2.13.0}" &&
        .venv/bin/python -m pip install -q -c constraints.txt -e . || { echo "could not install minidiff"; exit 1; }
fi
timings=0
args=()
for arg in "$@"; do
    if [ "$arg" = "--timings" ]; then timings=1; else args+=("$arg"); fi
done
check() { .venv/bin/python benchmarks/gpu_check.py --device cuda "$@"; }
check --stage preflight || { echo "preflight failed: fix the above before the GPU check can run"; exit 1; }
status=0
check --stage check "${args[@]}" || status=1
if [ "$timings" = 1 ]; then
    check --stage timings "${args[@]}" || status=1
    .venv/bin/python benchmarks/roofline.py --device cuda --json "${ROOFLINE_JSON:-runs/roofline_cuda.json}" || status=1
fi
exit "$status"
