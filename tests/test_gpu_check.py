"""benchmarks/gpu_check.py in its CPU smoke mode (--device cpu --quick): every part runs, every
check it can make on a CPU passes, and the summary says so. The CUDA-only checks (sync debug
mode, peak memory, fused backends) only run on a GPU: see README, "GPU check"."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(CHECK), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def test_in_process_parts_on_cpu():
    done = run("--device", "cpu", "--quick", "--skip", "scripts")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[PASS] padded == unpadded, SDPA math" in done.stdout
    assert "[INFO] sampler ms/step" in done.stdout
    for cache in ("none", "prefix", "dual"):
        for batch in (1, 8):
            assert f"[INFO] sampler ms/step, cache {cache}, eager, batch {batch}" in done.stdout
    assert "[INFO] CPT micro-batch 2 x 64" in done.stdout
    assert "0 failed" in done.stdout


@pytest.mark.slow  # eleven script runs (python + torch start-up each)
def test_every_script_on_cpu(tmp_path):
    done = run("--device", "cpu", "--quick", "--skip", "padding", "sampler", "sampler-caches", "training-syncs", "memory", "--out", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("train_cpt.py LoRA exits 0", "resume equals the uninterrupted run", "torchrun 1 process(es)",
                 "train_sft.py exits 0", "evaluate.py device and precision", "sample.py infill", "sample.py cfg"):
        assert f"[PASS] {name}" in done.stdout, name
    assert (tmp_path / "cpt" / "run.json").is_file()


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_or_crashed_check_gives_exit_status_1(monkeypatch, capsys):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check, "check_padding", lambda report, *_: report.check("made up", False, "x"))
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip", "scripts", "sampler", "sampler-caches", "training-syncs", "memory"]) == 1
    assert "FAILED: made up" in capsys.readouterr().out

    def crash(*_):
        raise ValueError("boom")

    monkeypatch.setattr(gpu_check, "check_padding", crash)
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip", "scripts", "sampler", "sampler-caches", "training-syncs", "memory"]) == 1
    assert "FAILED: padding part ran" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_gpu_check():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
