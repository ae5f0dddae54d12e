"""benchmarks/gpu_check.py in its CPU smoke mode (--device cpu --quick): every part runs, every
check it can make on a CPU passes, and the summary says so. The CUDA-only checks (sync debug
mode, peak memory, fused backends) only run on a GPU: see README, "GPU check"."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"


def run(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    """gpu_check.py ARGS --json FILE: the finished process and {check name: status}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "checks.json"
    done = subprocess.run([sys.executable, str(CHECK), *map(str, args), "--json", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    checks = json.loads(out.read_text()) if out.is_file() else {"checks": []}
    return done, {c["name"]: c["status"] for c in checks["checks"]}


def test_in_process_parts_on_cpu(tmp_path):
    done, checks = run(tmp_path, "--device", "cpu", "--quick", "--skip", "scripts")
    assert done.returncode == 0, done.stdout + done.stderr
    assert checks["padded == unpadded, SDPA math"] == "PASS"
    assert checks["sampler ms/step"] == "INFO"
    for cache in ("none", "prefix", "dual"):
        for batch in (1, 8):
            assert checks[f"sampler ms/step, cache {cache}, eager, batch {batch}"] == "INFO"
    assert checks["CPT micro-batch 2 x 64"] == "INFO"
    assert "FAIL" not in checks.values()


@pytest.mark.slow  # eleven script runs (python + torch start-up each)
def test_every_script_on_cpu(tmp_path):
    work = tmp_path / "work"
    done, checks = run(tmp_path, "--device", "cpu", "--quick", "--skip", "padding", "sampler", "sampler-caches",
                       "training-syncs", "memory", "--out", work)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("train_cpt.py LoRA exits 0", "resume equals the uninterrupted run", "torchrun 1 process(es)",
                 "train_sft.py exits 0", "evaluate.py device and precision", "sample.py infill", "sample.py cfg"):
        assert any(check.startswith(name) and status == "PASS" for check, status in checks.items()), name
    assert (work / "cpt" / "run.json").is_file()


def load_gpu_check(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(CHECK.parent))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_or_crashed_check_gives_exit_status_1(monkeypatch, tmp_path):
    gpu_check = load_gpu_check(monkeypatch)
    out = tmp_path / "checks.json"
    skip = ["--skip", "scripts", "sampler", "sampler-caches", "training-syncs", "memory", "--json", str(out)]

    def failed() -> list[str]:
        return [c["name"] for c in json.loads(out.read_text())["checks"] if c["status"] == "FAIL"]

    monkeypatch.setattr(gpu_check, "check_padding", lambda report, *_: report.check("made up", False, "x"))
    assert gpu_check.main(["--device", "cpu", "--quick", *skip]) == 1
    assert "made up" in failed()

    def crash(*_):
        raise ValueError("boom")

    monkeypatch.setattr(gpu_check, "check_padding", crash)
    assert gpu_check.main(["--device", "cpu", "--quick", *skip]) == 1
    assert "padding part ran" in failed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_gpu_check():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
