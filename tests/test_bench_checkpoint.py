"""benchmarks/bench_checkpoint.py at a tiny size: it saves a checkpoint through train_state, the
checkpoint verifies (the script asserts it), and every figure of its table is printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_checkpoint_smoke(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results.json"
    work.mkdir()
    done = subprocess.run([sys.executable, "benchmarks/bench_checkpoint.py", "--params", "20000", "--repeats", "1",
                           "--dir", str(work), "--json", str(results)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = json.loads(results.read_text())["rows"]
    assert [row["what"] for row in rows] == [
        "save a verified checkpoint", "verify it (resume's check)", "bound: write the same bytes + fsync",
        "bound: BLAKE2b of the file", "bound: BLAKE2b in memory"]
    assert not list(work.iterdir())  # the work directory is removed
