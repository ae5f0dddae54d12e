"""benchmarks/bench_data.py at tiny sizes: it runs end to end, the list pipeline and the shards
log the same step-1 loss (the script asserts it), and the corpora have the asked sizes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # six train_cpt.py processes
def test_bench_data_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--sizes", "5000", "20000"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| pipeline")}
    assert set(rows) == {"reference: Python lists", "shards, cold cache", "shards, warm cache"}
    for cells in rows.values():
        small, large = (float(cells[i].replace(",", "")) for i in (1, 2))
        assert 50 < small < 5000 and 50 < large < 5000  # MiB of a Python + torch process
    small_tokens, large_tokens = (int(x.replace(",", "")) for x in
                                  re.search(r"corpora: ([\d,]+) and ([\d,]+) tokens", done.stdout).groups())
    assert 4000 < small_tokens < 6500 and 18000 < large_tokens < 22000
    assert "tokens/s cold" in done.stdout and "start to end of step 1" in done.stdout
