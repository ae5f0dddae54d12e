"""benchmarks/gpu_check.sh and its preflight without a GPU: the dry run on the CPU passes every
stage; a missing driver is the first thing said; a compiled kernel that fails or disagrees with
eager fails the preflight. The GPU stages themselves are tests/test_cuda.py (`pytest -m cuda`)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def load_gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # eleven script runs and a compile of the sampler step on the CPU: 3-5 minutes
def test_the_dry_run_passes_every_stage_on_the_cpu():
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    stages = [line for line in done.stdout.splitlines() if line.startswith("== stage")]
    assert stages == ["== stage preflight: ok", "== stage tests: ok"]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_a_missing_driver_is_said_first(tmp_path):
    """nvidia-smi failing (an old or missing driver): the driver stage says so and nothing runs after it."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the driver\"\nexit 9\n")
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "== stage driver: failed: nvidia-smi does not answer (NVIDIA-SMI has failed because it couldn't communicate "
        "with the driver); install or load the NVIDIA driver"]


def test_a_failing_or_wrong_compiled_kernel_fails_the_preflight(monkeypatch, capsys):
    gpu_check = load_gpu_check(monkeypatch)

    def no_libcuda(fn, **options):
        def run(*args):
            raise RuntimeError("Failed to find libcuda.so\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", no_libcuda)
    assert gpu_check.preflight(torch.device("cpu")) == 1
    assert "[MISSING] a compiled kernel runs on cpu (fp32, bf16 autocast): RuntimeError: Failed to find libcuda.so\n" \
        in capsys.readouterr().out
    monkeypatch.setattr(torch, "compile", lambda fn, **options: lambda a, b: fn(a, b) + 1)  # a wrong kernel
    assert gpu_check.compiled_kernel(torch.device("cpu")) == "the compiled kernel's torch.float32 result differs from eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_gpu_check():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]



def test_an_old_driver_is_named_before_anything_runs_on_the_gpu(monkeypatch, capsys):
    """A driver older than torch's CUDA runtime (torch then sees no GPU): the preflight says which
    versions those are and compiles nothing."""
    gpu_check = load_gpu_check(monkeypatch)
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12020, raising=False)  # CUDA 12.2
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.preflight(torch.device("cuda", 0)) == 1
    out = capsys.readouterr().out
    assert "[MISSING] CUDA driver >= torch's CUDA runtime: driver 12.2, torch's runtime 13.0: update the driver" in out
    assert "compiled kernel" not in out
