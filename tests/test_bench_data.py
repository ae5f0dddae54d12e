"""benchmarks/bench_data.py at tiny sizes: it runs end to end, the list pipeline and the shards
log the same step-1 loss (the script asserts it), and the corpora have the asked sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # six train_cpt.py processes
def test_bench_data_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = tmp_path / "data.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--sizes", "5000", "20000",
                           "--json", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(results.read_text())
    rows = {p["pipeline"]: p for p in report["pipelines"]}
    assert set(rows) == {"reference: Python lists", "shards, cold cache", "shards, warm cache"}
    for cells in rows.values():
        small, large = cells["small_rss_mib"], cells["large_rss_mib"]
        assert 50 < small < 5000 and 50 < large < 5000  # MiB of a Python + torch process
    small_tokens, large_tokens = (size["tokens"] for size in report["sizes"])
    assert 4000 < small_tokens < 6500 and 18000 < large_tokens < 22000
    assert all(size["cold_tok_s"] > 0 and size["warm_tok_s"] > 0 and size["warm_s"] > 0 for size in report["sizes"])
