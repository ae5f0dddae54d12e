"""benchmarks/bench_sample.py on a tiny model directory: the script runs end to end, its
`generate` commits the same tokens as its plain full-canvas reference (the script asserts it),
and a bad --chat-data ends with one sentence and exit status 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_model_dir

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_sample.py"


def run(*args, script: Path = BENCH, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def run_json(tmp_path: Path, script: str, *args, timeout: int = 300) -> dict:
    """benchmarks/SCRIPT ARGS --json FILE: exit status 0, then what it wrote to FILE."""
    out = tmp_path / f"{Path(script).stem}.json"
    done = run(*args, "--json", out, script=ROOT / "benchmarks" / script, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), seed=5)


@pytest.mark.slow  # one python + torch start-up
def test_bench_sample_chat_prompts(model_dir, tmp_path):
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in [("Merhaba", "Selam"), ("Nasılsın?", "İyiyim."),
                                         ("Unused", "row")]), encoding="utf-8")
    report = run_json(tmp_path, "bench_sample.py", "--model", model_dir, "--chat-data", rows, "--num-prompts", 2,
                      "--max-new-tokens", 12, "--threshold", 0.2, "--show")
    table = {row["sampler"]: row for row in report["rows"]}
    # 2 prompts x 12 tokens; one call per token for both step-per-token samplers
    assert table["reference (full-canvas logits)"]["calls"] == 24
    assert table["generate (block logits only)"]["calls"] == 24
    exact = table["generate (block logits only)"]
    assert exact["tokens_equal"] == exact["tokens"] == 24
    threshold_calls = table["generate, threshold 0.2"]["calls"]
    assert 2 <= threshold_calls <= 24  # at least one call per block (one block per prompt)
    assert report["source"].startswith("2 chat prompts") and len(report["shown"]) == 2


@pytest.mark.slow
def test_bench_sample_bad_chat_data(model_dir, tmp_path):
    missing = tmp_path / "missing.jsonl"
    done = run("--model", model_dir, "--chat-data", missing, "--max-new-tokens", 4)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error:") and str(missing.name) in done.stderr


@pytest.mark.slow  # five python + torch start-ups
def test_bench_memory_tiny(tmp_path):
    report = run_json(tmp_path, "bench_memory.py", "--vocab", "300", "--hidden", "32", "--intermediate", "48",
                      "--heads", "2", "--layers", "1", "--rank", "4", "--seq", "16", "--batches", "2", "3",
                      "--repeats", "1", "--budget-mib", "0.01")
    memory, timing = report["memory"], report["step_seconds"]
    # both paths at both batch sizes, the same masks (the script checks that the losses agree)
    assert [r["path"] for r in memory] == ["dense", "dense", "chunked", "chunked"]
    assert memory[0]["masked"] == memory[2]["masked"] and memory[1]["masked"] == memory[3]["masked"]
    assert memory[1]["masked"] > memory[0]["masked"]
    assert all(r["peak_reset"] for r in memory)
    assert list(timing) == ["dense", "chunked"] and timing["dense"] > 0 and timing["chunked"] > 0


def test_bench_memory_saved_activations_tiny(tmp_path):
    report = run_json(tmp_path, "bench_memory.py", "--activations", "--hidden", "32", "--intermediate", "48",
                      "--heads", "2", "--rank", "4", "--seq", "16")
    kib = [row["kib_per_token_per_layer"] for row in report["activations"]]
    # fp32 > bf16 autocast > bf16 with checkpointing, which keeps only each layer's fp32 input: 32 x 4 bytes
    assert len(kib) == 3 and kib[0] > kib[1] > kib[2] > 0
    assert abs(kib[2] - 32 * 4 / 1024) < 1e-3


def test_bench_memory_bad_flags():
    bench = ROOT / "benchmarks" / "bench_memory.py"
    done = subprocess.run([sys.executable, str(bench), "--t", "1.5"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--t must lie in (0, 1]" in done.stderr


@pytest.mark.slow  # one python + torch start-up
def test_bench_sample_caches_on_text(model_dir, tmp_path):
    """--cache none prefix dual with --text-data: a row per cache and per cache + threshold; the
    exact sampler still equals the reference; a cache's agreement is a count out of the total."""
    rows = tmp_path / "speeches.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ["Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu. " * 3,
                             "İstanbul Boğazı Avrupa ile Asya'yı birbirinden ayırır. " * 3]), encoding="utf-8")
    report = run_json(tmp_path, "bench_sample.py", "--model", model_dir, "--text-data", rows, "--num-prompts", 2,
                      "--prompt-length", 9, "--max-new-tokens", 8, "--cache", "none", "prefix", "dual",
                      "--threshold", 0.5)
    table = {row["sampler"]: row for row in report["rows"]}
    assert list(table) == ["reference (full-canvas logits)", "generate (block logits only)",
                           "generate, threshold 0.5", "generate, cache prefix",
                           "generate, cache prefix, threshold 0.5", "generate, cache dual",
                           "generate, cache dual, threshold 0.5"]
    exact = table["generate (block logits only)"]
    assert exact["tokens_equal"] == exact["tokens"] == 16
    assert table["generate, cache dual"]["calls"] == 16  # one call per token (2 prompts x 8)
    assert report["source"].startswith("2 plain-text prompts of 9 tokens")
    bad = run("--model", model_dir, "--text-data", rows, "--num-prompts", 500)
    assert bad.returncode == 2 and "fewer than 500 prompts" in bad.stderr


@pytest.mark.slow  # one python + torch start-up, every hot path at the tiny shape
def test_roofline_toy_counts_match_hand_counts(tmp_path):
    """roofline.py --toy: the decoder's FLOPs (2 M K N) and bytes (W, b, x, y), one encoder
    layer's FLOPs (its four products + attention) and one sampler step's (the plain model's, no
    LoRA) equal counts written out by hand."""
    out = tmp_path / "toy.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--toy", "--dtype", "float32",
                           "--repeats", "1", "--json", out], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["name"]: row for row in report["paths"]}
    H, I, V, heads = 64, 96, 1000, 2  # the toy shape (benchmarks/common.py: TINY)
    M = 8
    decoder = rows[f"decoder [{M}, {H}] x [{H}, {V}]"]
    assert decoder["flops"] == 2 * M * H * V
    assert decoder["bytes"] == 4 * (V * H + V + M * H + M * V)  # read W, b, x; write y (fp32)
    S, d = 8, H // heads
    products = H * 3 * H + H * H + H * 2 * I + I * H  # Wqkv, attention Wo, Wi, MLP Wo
    attention = 2 * heads * S * S * d * 2  # q k^T and the weighted sum of v
    assert rows[f"encoder layer, {S} tokens"]["flops"] == 2 * S * products + attention
    # one sampler step without a cache, on the plain model (no LoRA yet): prompt 8 + 16 new tokens
    # in two blocks of 8, two steps each (4 then 4 positions): every step runs both layers on
    # the 24-token canvas, the head and the decoder on the 8 or 4 positions still masked
    T, layers, rows_per_block = 8 + 16, 2, 8 + 4
    canvas = layers * (2 * T * products + 2 * heads * T * T * d * 2)
    head_and_decoder = 2 * H * H + 2 * H * V  # per position
    assert rows["sampler step, cache none, batch 1"]["flops"] == (4 * canvas + 2 * rows_per_block * head_and_decoder) / 4
    assert {"sampler step, cache dual, batch 8", "LoRA micro-batch 2 x 16 (r=8), fwd + bwd"} <= set(rows)
    for row in rows.values():
        assert row["flops"] > 0 and row["bytes"] > 0 and row["seconds"] > 0 and row["bound_seconds"] > 0
    table = [line for line in done.stdout.splitlines() if line.startswith(f"| decoder [{M}, ")]
    assert len(table) == 1 and table[0].split(" | ")[1] == f"{2 * M * H * V / 1e9:.3g}"


def test_roofline_bad_compare_file(tmp_path):
    bad = tmp_path / "gpu.json"
    bad.write_text("{}", encoding="utf-8")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--toy", "--compare", bad],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: --compare {bad}") and done.stderr.count("\n") == 1


@pytest.mark.slow  # one python + torch start-up, two tiny models, 12 scored choices
def test_bench_dtype_tiny(model_dir, tmp_path):
    """bench_dtype.py --toy --speed --model: the three speed rows; fp32 agrees with itself
    exactly, and the other runs' counts add up to what the inputs hold (2 prompts x 64 tokens;
    3 rows with 12 choices in all)."""
    rows = [{"prompt": "Türkiye Cumhuriyeti 1923", "choices": ["yılında", "yılinda", "yılındı", "yıl"], "label": 0},
            {"prompt": "İstanbul Boğazı Avrupa ile", "choices": ["Asya'yı", "Asyayı"], "label": 0},
            {"prompt": "başkenti", "choices": ["Ankara", "Ankare", "Ankra", "Ankaro", "Anka", "Ank"], "label": 0}]
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    report = run_json(tmp_path, "bench_dtype.py", "--toy", "--speed", "--repeats", "1", "--model", model_dir,
                      "--mc-data", mc, "--num-prompts", "2", "--mc-samples", "2")
    speed = report["speed"]["rows"]
    assert [row["workload"].split(" ")[0] for row in speed] == ["decoder", "sampler", "scoring"]
    assert all(row["fp32_ms"] > 0 and row["bf16_ms"] > 0 for row in speed)
    # fp32 against itself, bf16 and fp64 against fp32, then fp32 with another Monte-Carlo seed
    table = {row["run"]: row for row in report["agreement"]["rows"]}
    assert list(table) == ["fp32", "bf16", "fp64", "fp32, seed 1"]
    assert table["fp32"]["greedy"] == {"tokens_equal": 128, "tokens": 128, "prompts_equal": 2, "prompts": 2}
    assert table["fp32"]["scores"]["mean_abs_diff"] == table["fp32"]["scores"]["max_abs_diff"] == 0.0
    assert table["fp32"]["scores"]["choices"] == 12
    for name in ("bf16", "fp64"):
        greedy, scores = table[name]["greedy"], table[name]["scores"]
        assert greedy["tokens"] == 2 * 64 and 0 <= greedy["tokens_equal"] <= greedy["tokens"]
        assert 0 <= scores["mean_abs_diff"] <= scores["max_abs_diff"] < 1.0  # rounding, not a different model
        assert scores["rows"] == 3 and scores["flips"] in range(4)
    assert table["fp32, seed 1"]["greedy"] is None  # (as fp32): temperature 0, the seed changes no token


def test_bench_dtype_model_without_data(model_dir):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dtype.py"), "--model", str(model_dir)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --model needs --mc-data") and done.stderr.count("\n") == 1


@pytest.mark.slow  # one python + torch start-up, a tiny random model
def test_bench_dtype_tokens_per_second_tiny(tmp_path):
    """--tokens-per-second --toy: a row per batch x cache, each with one forward per step
    (8 new tokens in 8 steps) and positive rates in both precisions."""
    report = run_json(tmp_path, "bench_dtype.py", "--toy", "--tokens-per-second", "--batches", "1", "3",
                      "--new-tokens", "8")
    rows = report["tokens_per_second"]["rows"]
    assert [(r["batch"], r["cache"], r["mode"]) for r in rows] == [
        (b, c, "eager") for b in (1, 3) for c in ("none", "prefix", "dual")]
    assert all(r["forwards"] == 8 and r["fp32_tokens_per_s"] > 0 and r["bf16_tokens_per_s"] > 0 for r in rows)


@pytest.mark.slow  # compiles the tiny model's sampler step twice (fp32, bf16): about half a minute
def test_bench_dtype_tokens_per_second_compiled_tiny(tmp_path):
    """--compile adds a compiled row after each eager one; the compiled sampler scores the whole
    block every step, so it makes the same 8 forwards."""
    report = run_json(tmp_path, "bench_dtype.py", "--toy", "--tokens-per-second", "--batches", "1", "--caches",
                      "dual", "--compile", "--new-tokens", "8", timeout=600)
    rows = report["tokens_per_second"]["rows"]
    assert [(r["batch"], r["cache"], r["mode"]) for r in rows] == [(1, "dual", "eager"), (1, "dual", "compiled")]
    assert all(r["forwards"] == 8 and r["fp32_tokens_per_s"] > 0 and r["bf16_tokens_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("script, args, message", [
    ("serve_acceptance.py", ["--model", "missing-dir"], "error: --model missing-dir has no tokenizer.json"),
    ("bench_replicas.py", ["--clients", "0"], "error: --clients, --rounds and --max-tokens must be integers >= 1"),
    ("bench_replicas.py", ["--nginx", "missing-nginx"], "error: nginx is not at missing-nginx"),
])
def test_serving_benchmarks_bad_flags(script, args, message):
    done = run(*args, script=ROOT / "benchmarks" / script, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1


@pytest.mark.slow  # three serve.py start-ups and nginx
def test_bench_replicas_splits_between_replicas_tiny(tmp_path):
    """4 clients at once through nginx's least_conn upstream: every answer 200 in both
    configurations; the replicas' own /metrics count the 4 requests between them, each some."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").is_file():
        pytest.skip("needs nginx (apt-get install nginx)")
    report = run_json(tmp_path, "bench_replicas.py", "--clients", 4, "--rounds", 1, "--max-tokens", 32)
    assert [(r["config"], r["clients"], r["ok"], r["requests"]) for r in report["rows"]] == [
        ("2 replicas x 1 thread", 4, 4, 4), ("1 replica x 2 threads", 4, 4, 4)]
    assert sum(report["split"]) == 4 and min(report["split"]) >= 1
    assert all(r["p95_s"] >= r["p50_s"] > 0 and r["tokens_per_s"][0] > 0 for r in report["rows"])
