"""sample.py end to end on a tiny model directory (subprocess), plus its bad inputs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_model_dir

import minidiff
from minidiff.errors import UserError
from minidiff.sampler import SamplerConfig
from minidiff.speed.sampling import FastConfig, generate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sample.py"


def run(*args, stdin: str | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, input=stdin, timeout=120, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), seed=3)


@pytest.fixture(scope="module")
def sample_module():
    spec = importlib.util.spec_from_file_location("sample_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # one python + torch start-up per run
def test_prompts_json_match_generate(model_dir):
    prompts = ["Merhaba, nasılsın?", "Türkiye'nin başkenti neresidir?"]
    res = run("--model", model_dir, "--prompt", prompts[0], "--prompt", prompts[1], "--preset",
              "diffutron-short", "--temperature", "0", "--max-new-tokens", "24", "--steps", "12",
              "--block-length", "8", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["config"]["repetition_penalty"] == 1.2
    assert [r["prompt"] for r in data["results"]] == prompts

    # the same generation in process: <bos> + dllm's chat template, no closing <eos>
    tok, model = minidiff.load_tokenizer(model_dir), minidiff.load_model(model_dir)
    ids = [[tok.bos_id] + tok.encode(f"[Question]\n{p}\n[/Question]\n\n[Answer]\n", add_special_tokens=False)
           for p in prompts]
    # 12 steps per canvas; canvases (prompt + 24 masks) of different 16-position buckets run apart
    assert data["steps"] == 12 * len({(len(i) + 24 + 15) // 16 for i in ids})
    config = FastConfig.preset("diffutron-short", temperature=0.0, max_new_tokens=24, steps=12, block_length=8)
    out = generate(model, ids, config, mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok)
    for r, answer in zip(data["results"], out.answers()):
        assert r["ids"] == answer and len(answer) == 24
        assert tok.mask_id not in r["ids"]


@pytest.mark.slow  # one python + torch start-up per run
def test_plain_output_is_only_the_answer_and_trace_html(model_dir, tmp_path):
    page = tmp_path / "trace.html"
    args = ["--model", model_dir, "--prompt", "Merhaba", "--max-new-tokens", "8", "--steps", "8",
            "--block-length", "4", "--raw", "--seed", "1"]
    res = run(*args, "--trace-html", page)
    assert res.returncode == 0, res.stderr
    assert "\x1b[" not in res.stdout and "░" not in res.stdout  # not a terminal: no live view
    tok, model = minidiff.load_tokenizer(model_dir), minidiff.load_model(model_dir)
    ids = [tok.bos_id] + tok.encode("Merhaba", add_special_tokens=False)
    out = generate(model, [ids], SamplerConfig(max_new_tokens=8, steps=8, block_length=4, seed=1),
                   mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok)
    answer = out.answers()[0]
    answer = answer[: answer.index(tok.eos_id)] if tok.eos_id in answer else answer
    assert res.stdout == tok.decode(answer).split("[/Answer]")[0].strip() + "\n"
    text = page.read_text(encoding="utf-8")
    assert 'type="range"' in text and "<script>" in text
    assert "src=" not in text and "http" not in text  # self-contained: no external assets
    data = json.loads(text.split("const DATA = ")[1].split(";\n")[0])
    assert data["steps"] == 8 and sorted(data["rows"][0]["reveal"]) == list(range(1, 9))


@pytest.mark.slow  # one python + torch start-up per run
def test_infill_and_chat(model_dir):
    res = run("--model", model_dir, "--infill", "İstanbul <mask> <mask> Asya'yı ayırır.", "--json",
              "--steps", "2", "--block-length", "4")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    tok = minidiff.load_tokenizer(model_dir)
    assert tok.mask_id not in data["ids"] and data["steps"] >= 1
    given = [tok.bos_id] + tok.encode("İstanbul ", add_special_tokens=False)
    assert data["ids"][: len(given)] == given
    assert data["text"].startswith("İstanbul") and data["text"].endswith("Asya'yı ayırır.")

    chat = run("--model", model_dir, "--chat", "--max-new-tokens", "8", "--steps", "4",
               "--block-length", "8", stdin="Merhaba\nNasılsın?\n")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) >= 2


@pytest.mark.slow  # one python + torch start-up per run
def test_bad_inputs_exit_2(model_dir):
    res = run("--model", model_dir, "--prompt", "x", "--steps", "0")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: ") and "steps" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""


def test_tokenizer_without_mask(sample_module, tmp_path):
    broken = make_model_dir(tmp_path / "nomask", seed=0)
    spec = (broken / "tokenizer.json").read_text(encoding="utf-8").replace("<mask>", "<masq>")
    (broken / "tokenizer.json").write_text(spec, encoding="utf-8")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = broken / name
        f.write_text(f.read_text(encoding="utf-8").replace('"mask_token": "<mask>", ', "")
                     .replace(', "mask_token": "<mask>"', ""), encoding="utf-8")
    with pytest.raises(UserError, match="mask"):
        sample_module.main(["--model", str(broken), "--prompt", "x"])


@pytest.mark.parametrize("args, words", [
    (["--block-length", "0"], "block_length"),
    (["--temperature", "-1"], "temperature"),
    (["--remasking", "lowest"], "remasking"),
    (["--unmasking", "cosine"], "unmasking"),
    (["--prompt", "ev " * 600], "max_position_embeddings"),
    (["--infill", "no markers here"], "<mask>"),
    (["--chat", "--trace-html", "x.html"], "--trace-html"),
])
def test_bad_inputs_in_process(sample_module, model_dir, args, words):
    if not any(a in args for a in ("--prompt", "--infill", "--chat")):
        args = ["--prompt", "Merhaba"] + args
    with pytest.raises(UserError, match=words):
        sample_module.main(["--model", str(model_dir), *args])


def test_cache_flags(sample_module, model_dir, capsys):
    """--cache dual --cache-refresh 1 (a cache refilled at every step) writes the exact answer;
    the flags reach FastConfig; a bad refresh interval is one sentence."""
    base = ["--model", str(model_dir), "--prompt", "Merhaba", "--temperature", "0", "--max-new-tokens",
            "8", "--steps", "8", "--block-length", "4", "--json"]
    answers = []
    for extra in ([], ["--cache", "dual", "--cache-refresh", "1"]):
        assert sample_module.main(base + extra) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[1]["config"]["cache"] == "dual" and answers[1]["config"]["cache_refresh"] == 1
    assert answers[1]["results"][0]["ids"] == answers[0]["results"][0]["ids"]
    with pytest.raises(UserError, match="cache_refresh"):
        sample_module.main(base + ["--cache", "prefix", "--cache-refresh", "0"])


def test_unmasking_flag_reaches_the_config(sample_module):
    """--unmasking sets SamplerConfig.unmasking, over a preset too; without it the default stays."""
    args = sample_module.parse_args(["--model", "m", "--prompt", "x", "--unmasking", "llada"])
    assert sample_module.sampler_config(args).unmasking == "llada"
    args = sample_module.parse_args(["--model", "m", "--prompt", "x", "--preset", "diffutron-short",
                                     "--unmasking", "llada"])
    assert sample_module.sampler_config(args).unmasking == "llada"
    args = sample_module.parse_args(["--model", "m", "--prompt", "x"])
    assert sample_module.sampler_config(args).unmasking == "dllm"


def test_bad_flags_are_one_sentence(tmp_path):
    """Flags come from SamplerConfig through minidiff.plumbing.flags: a bad value or a missing choice is one
    `error:` sentence with exit status 2, not argparse's usage dump."""
    for argv in (["--model", "m", "--prompt", "x", "--steps", "many"],
                 ["--model", "m", "--prompt", "x", "--cache", "triple"],
                 ["--model", "m"]):
        res = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "usage:" not in res.stderr


def test_steps_beyond_a_block_are_capped_with_a_note(sample_module, model_dir, capsys):
    """--steps 1000000000 (which ran for ever) writes the answer of --steps 16, a block's
    width for 16 new tokens in blocks of 8 x 2 blocks, and says so on stderr."""
    base = ["--model", str(model_dir), "--prompt", "Merhaba", "--temperature", "0", "--max-new-tokens",
            "16", "--block-length", "8", "--json"]
    assert sample_module.main(base + ["--steps", "16"]) == 0
    capped = capsys.readouterr()
    assert sample_module.main(base + ["--steps", "1000000000"]) == 0
    huge = capsys.readouterr()
    assert capped.err == ""
    assert huge.err.startswith("note: --steps 1000000000 gives 500000000 steps per block")
    assert "at most 8 steps" in huge.err and len(huge.err.splitlines()) == 1
    capped, huge = json.loads(capped.out), json.loads(huge.out)
    assert huge["results"] == capped["results"] and huge["steps"] == capped["steps"]


def test_many_prompts_run_in_batches(sample_module, model_dir, capsys):
    """Three prompts with --batch-size 2 (two batches) print the answers of one batch of three:
    each row of a batch equals that prompt alone (tests/test_sampler.py)."""
    base = ["--model", str(model_dir), "--prompt", "Merhaba", "--prompt", "Nasılsın?", "--prompt", "Ev",
            "--temperature", "0", "--max-new-tokens", "8", "--steps", "8", "--block-length", "4", "--json"]
    answers = []
    for batch_size in ("3", "2"):
        assert sample_module.main(base + ["--batch-size", batch_size]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[1]["results"] == answers[0]["results"]
    assert answers[1]["steps"] > answers[0]["steps"]  # two batches: twice the model calls


@pytest.mark.slow  # one python + torch start-up per run
def test_bad_sizes_exit_2_in_one_line(model_dir, tmp_path):
    page = tmp_path / "t.html"
    for args, words in ((["--batch-size", "0"], "--batch-size"), (["--seed", str(2**64)], "seed"),
                        (["--prompt", "y", "--batch-size", "1", "--trace-html", page], "--trace-html")):
        res = run("--model", model_dir, "--prompt", "x", *args)
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert words in res.stderr and "Traceback" not in res.stderr
