#!/usr/bin/env bash
# The first run on a new GPU in stages, each saying how it ended as it ends; the stages and the
# venv (.venv-gpu, by setup.sh): docs/devices.md ("On a new GPU, run this first").
#
#   bash benchmarks/gpu_check.sh                 # driver, preflight, tests
#   bash benchmarks/gpu_check.sh --timings       # and the timings (JSON to $GPU_CHECK_OUT, default runs/)
#   bash benchmarks/gpu_check.sh --dry-run       # preflight and tests on the CPU at a tiny shape, in .venv
set -uo pipefail
cd "$(dirname "$0")/.."
timings=0 device=cuda venv=.venv-gpu
for arg in "$@"; do
    case "$arg" in
        --timings) timings=1 ;;
        --dry-run) device=cpu venv=.venv ;;
        *) echo "unknown argument $arg; expected --timings or --dry-run"; exit 2 ;;
    esac
done
stage() { echo "== stage $1: $2"; }
if [ "$device" = cuda ]; then
    if ! smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1); then
        stage driver "failed: nvidia-smi does not answer ($smi); install or load the NVIDIA driver"
        exit 1
    fi
    stage driver "ok ($smi)"
    if [ ! -x "$venv/bin/python" ]; then
        VENV=$venv EXTRAS=test bash setup.sh || { stage install "failed: could not install minidiff in $venv"; exit 1; }
    fi
fi
py="$venv/bin/python"
"$py" benchmarks/gpu_check.py --device "$device" ||
    { stage preflight "failed: fix the above before the tests can run"; exit 1; }
stage preflight ok
status=0
if MINIDIFF_TEST_DEVICE=$device "$py" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py; then
    stage tests ok
else
    stage tests failed; status=1
fi
if [ "$timings" = 1 ]; then
    out=${GPU_CHECK_OUT:-runs}
    mkdir -p "$out"
    if "$py" benchmarks/bench_dtype.py --tokens-per-second --compile --preset diffutron-long --new-tokens 128 \
            --device "$device" --json "$out/tokens_per_second_$device.json" &&
        "$py" benchmarks/roofline.py --device "$device" --json "$out/roofline_$device.json"; then
        stage timings ok
    else
        stage timings failed; status=1
    fi
fi
exit "$status"
