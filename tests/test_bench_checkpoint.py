"""benchmarks/bench_checkpoint.py at a tiny size: it saves a checkpoint through train_state, the
checkpoint verifies (the script asserts it), and every figure of its table is printed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_checkpoint_smoke(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/bench_checkpoint.py", "--params", "20000", "--repeats", "1",
                           "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "save a verified checkpoint", "verify it (resume's check)", "bound: write the same bytes + fsync",
        "bound: BLAKE2b of the file", "bound: BLAKE2b in memory"]
    assert not list(tmp_path.iterdir())  # the work directory is removed
