"""docs/walkthrough.py runs end to end, shortened: the held-out NELBO bound it prints falls and
the sampler writes characters. Run as a reader runs it, in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "docs" / "walkthrough.py"), *flags],
                          capture_output=True, text=True, env=env, timeout=300)


def test_walkthrough_bound_falls_and_sampling_writes():
    result = run("--steps", "40", "--eval-every", "20", "--hidden", "32", "--layers", "2",
                 "--sample-tokens", "16")
    assert result.returncode == 0, result.stderr
    bounds = [float(v) for v in re.findall(r"held-out NELBO bound ([0-9.]+) nats/char", result.stdout)]
    assert len(bounds) == 3, result.stdout  # steps 0, 20, 40
    assert bounds[-1] < bounds[0] - 0.2, bounds  # from ~log(V) towards the character frequencies
    sampled = re.search(r"sampled (\d+) tokens \((\d+) characters\) in (\d+) model calls:\n(.*)\n",
                        result.stdout)
    assert sampled, result.stdout
    assert int(sampled.group(1)) == 16 and 1 <= int(sampled.group(3)) <= 16
    assert int(sampled.group(2)) > 0  # characters, not only special tokens
    assert sampled.group(4).startswith("Türkiye") and len(sampled.group(4)) == 7 + int(sampled.group(2))


def test_walkthrough_bad_text_path_is_one_sentence(tmp_path):
    result = run("--text", str(tmp_path / "missing.txt"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --text {tmp_path / 'missing.txt'}: no such file; "
                                                  "expected a UTF-8 text file"]


def test_walkthrough_imports_only_the_algorithm():
    """The modules of the package loaded by the walkthrough's imports: the algorithm's, nothing else."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='walkthrough'); "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'minidiff')))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "docs" / "walkthrough.py")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    algorithm = {"minidiff", "minidiff.model", "minidiff.diffusion", "minidiff.lora", "minidiff.optim",
                 "minidiff.sampler", "minidiff.errors"}
    loaded = set(result.stdout.split())
    assert {"minidiff.model", "minidiff.sampler"} <= loaded <= algorithm, sorted(loaded - algorithm)
