"""evaluate.py end to end: a real run on a tiny model (JSON contents, the Table 4 markdown,
--compare), and bad inputs: one `error:` sentence, exit status 2, no traceback, no results file."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TURKISH_TEXT, make_model_dir

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), seed=1)


@pytest.mark.slow
def test_run_writes_results_and_table_then_compares(tmp_path, model_dir):
    mc = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Türkiye'nin başkenti", "choices": ["Ankara", "İzmir"], "label": 0},
        {"prompt": "Güneş doğudan", "choices": ["batar", "doğar", "uçar"], "label": 1},
        {"prompt": "Kedi", "choices": ["miyavlar", "havlar"], "label": 0},
    ])
    irony = tmp_path / "val.csv"
    irony.write_text("text,label\nHarika yine yağmur!,1\nBugün okula gittim.,0\n", encoding="utf-8")
    text = tmp_path / "essays.txt"
    text.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    common = ["--model", model_dir, "--mc-samples", 2, "--batch-size", 8, "--max-len", 24,
              "--no-progress", "--seed", 7]
    first = run(*common, "--task", f"mc:{mc}", "--task", f"ironytr:{irony}",
                "--task", f"perplexity:{text}", "--out", out)
    assert first.returncode == 0, first.stderr
    results = json.loads(out.read_text(encoding="utf-8"))
    tasks = results["tasks"]
    assert list(tasks) == [f"mc:{mc}", "ironytr", f"perplexity:{text}"]
    assert tasks[f"mc:{mc}"]["n"] == 3 and tasks["ironytr"]["n"] == 2
    for result in tasks.values():
        assert result["seed"] == 7 and result["model"] == str(model_dir) and result["settings"]
    assert set(tasks["ironytr"]["metrics"]) == {"acc", "acc_norm", "f1"}  # CETVEL: binary F1 of "Evet"
    assert set(tasks[f"mc:{mc}"]["metrics"]) == {"acc", "acc_norm"}
    ppl = tasks[f"perplexity:{text}"]
    assert ppl["metrics"]["perplexity"] > 1 and ppl["metrics"]["nelbo_perplexity"] > 1
    assert ppl["settings"]["mask_prob"] == 0.15 and ppl["settings"]["mlm_replace_80_10_10"] is False
    assert not list(tmp_path.glob("*.partial"))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic_path's temporary is gone
    # the table: multiple-choice tasks as rows, `acc ± se`, the average of their acc last
    accs = [tasks[k]["metrics"]["acc"] for k in (f"mc:{mc}", "ironytr")]
    errors = [tasks[k]["errors"]["acc"]["se"] for k in (f"mc:{mc}", "ironytr")]
    lines = first.stdout.splitlines()
    assert f"| IronyTR | {100 * accs[1]:.2f} ± {100 * errors[1]:.2f} |" in lines
    average_se = 100 * (errors[0] ** 2 + errors[1] ** 2) ** 0.5 / 2  # independent tasks
    assert lines[-1] == f"| **Average** | {100 * sum(accs) / 2:.2f} ± {average_se:.2f} |"
    assert any(line.startswith("| essays.txt | ") for line in lines)  # perplexity table

    again = tmp_path / "again.json"
    second = run(*common, "--task", f"ironytr:{irony}", "--out", again, "--compare", out)
    assert second.returncode == 0, second.stderr
    # same seed, same inputs: the same numbers; --compare adds the old run as a column
    assert json.loads(again.read_text())["tasks"]["ironytr"]["metrics"] == tasks["ironytr"]["metrics"]
    header = [line for line in second.stdout.splitlines() if line.startswith("| task")][0]
    assert header == f"| task (acc x 100) | {model_dir.name} | results |"
    assert second.stdout.splitlines()[-1].startswith(f"| **Average** | {100 * accs[1]:.2f} ± ")
    # equal numbers differ by less than their combined error: the old column is flagged
    assert f"| IronyTR | {100 * accs[1]:.2f} ± {100 * errors[1]:.2f} | {100 * accs[1]:.2f} ± " \
        f"{100 * errors[1]:.2f} ≈ |" in second.stdout.splitlines()


def mc_task(directory, name, rows, kind="mc"):
    return ["--task", f"{kind}:{write_jsonl(directory / name, rows)}"]


GOOD_ROW = {"prompt": "p", "choices": ["a", "b"], "label": 0}
BAD = {  # case: (arguments given the tmp dir, words the error sentence must contain)
    "unknown task": (lambda d: ["--task", "hellaswag_tr"], "not a known task"),
    "missing field": (lambda d: mc_task(d, "a.jsonl", [{"prompt": "p", "choices": ["a", "b"]}]),
                      "lacks ['label']"),
    "label outside the choices": (lambda d: mc_task(d, "b.jsonl", [dict(GOOD_ROW, label=2)]),
                                  "not an index"),
    "dataset label outside": (lambda d: mc_task(d, "i.jsonl", [{"text": "t", "label": 3}], "ironytr"),
                              "not one of the 2 choices"),
    "empty task": (lambda d: mc_task(d, "c.jsonl", []), "no rows"),
    "missing file": (lambda d: ["--task", f"belebele_tr:{d / 'nope.jsonl'}"], "does not exist"),
    "bad compare": (lambda d: mc_task(d, "e.jsonl", [GOOD_ROW]) + ["--compare", d / "old.json"],
                    "does not exist"),
}


def evaluate_script():
    """evaluate.py loaded as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def run_in_process(argv, capsys):
    """evaluate.py's main under run_cli, in this process (the subprocess start costs seconds)."""
    from minidiff.errors import run_cli

    script = evaluate_script()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: script.main([str(a) for a in argv]))
    return exit_info.value.code, capsys.readouterr().err


def test_markdown_table_shape():
    run = {"belebele_tr": {"kind": "mc", "title": "Belebele_TR", "metrics": {"acc": 0.27}},
           "ironytr": {"kind": "mc", "title": "IronyTR", "metrics": {"acc": 0.52}}}
    old = {"belebele_tr": {"kind": "mc", "title": "Belebele_TR", "metrics": {"acc": 0.5}},
           "xcopa_tr": {"kind": "mc", "title": "XCOPA_TR", "metrics": {"acc": 0.9}}}  # not a row
    table = evaluate_script().markdown_tables([("new", run), ("old", old)])
    assert table.splitlines() == [
        "| task (acc x 100) | new | old |",
        "|---|---:|---:|",
        "| Belebele_TR | 27.00 | 50.00 |",
        "| IronyTR | 52.00 | - |",
        "| **Average** | 39.50 | 50.00 (1/2) |",
    ]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_exit_2(case, tmp_path, model_dir, capsys):
    make_args, words = BAD[case]
    out = tmp_path / "results.json"
    code, err = run_in_process(["--model", model_dir, *make_args(tmp_path), "--out", out], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("case", ["dataset label outside"])  # one: a process start costs seconds
def test_bad_input_as_a_real_process(case, tmp_path, model_dir):
    make_args, words = BAD[case]
    out = tmp_path / "results.json"
    proc = run("--model", model_dir, *make_args(tmp_path), "--out", out, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory):
    """A model whose context is 16 positions."""
    return make_model_dir(tmp_path_factory.mktemp("short"), seed=1, max_position_embeddings=16)


def test_context_limit_cuts_prompts_and_clamps_blocks(tmp_path, short_model_dir, capsys):
    """Rows longer than the model's context lose their prompt's left part (counted, said on
    stderr), perplexity blocks are clamped to the context (said), an answer that cannot fit is
    refused in one sentence; --per-item writes every item's scores and errors."""
    long_prompt = "Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu ve"
    mc = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": long_prompt, "choices": ["evet", "hayır"], "label": 0},
        {"prompt": "Kedi", "choices": ["ev", "yol"], "label": 1}])
    text = tmp_path / "essays.txt"
    text.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    out, items = tmp_path / "results.json", tmp_path / "items.jsonl"
    code, err = run_in_process(["--model", short_model_dir, "--task", f"mc:{mc}", "--task", f"perplexity:{text}",
                                "--max-len", 64, "--scoring", "exact", "--per-item", items,
                                "--no-progress", "--out", out], capsys)
    assert code == 0, err
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks[f"mc:{mc}"]["truncated_prompts"] == 1 and "1 of 2 prompts cut" in err
    assert tasks[f"mc:{mc}"]["answers_scored"]["mc"] == 0
    assert tasks[f"perplexity:{text}"]["settings"]["block_len"] == 16 and "blocks of 16 tokens" in err
    rows = [json.loads(line) for line in items.read_text(encoding="utf-8").splitlines()]
    assert [r["item"] for r in rows] == [0, 1] and all(r["se"] == [0.0, 0.0] for r in rows)
    assert [r["exact"] for r in rows] == [[True, True]] * 2
    too_long = write_jsonl(tmp_path / "answer.jsonl", [{"prompt": "p", "choices": [long_prompt, "a"], "label": 0}])
    code, err = run_in_process(["--model", short_model_dir, "--task", f"mc:{too_long}", "--out", out], capsys)
    assert code == 2 and "does not fit the model's context of 16 tokens" in err and err.count("\n") == 1


def test_oversized_batch_is_refused_and_many_samples_run_chunked(tmp_path, model_dir, capsys):
    mc = mc_task(tmp_path, "m.jsonl", [{"prompt": "Kedi", "choices": ["miyavlar", "havlar"], "label": 0}])
    out = tmp_path / "r.json"
    code, err = run_in_process(["--model", model_dir, *mc, "--batch-size", 10**6, "--out", out], capsys)
    assert code == 2 and "--batch-size 1000000: expected 1 to 1024" in err and not out.exists()
    code, err = run_in_process(["--model", model_dir, *mc, "--scoring", "mc", "--mc-samples", 3000,
                                "--batch-size", 64, "--no-progress", "--out", out], capsys)
    assert code == 0, err
    task = json.loads(out.read_text())["tasks"][mc[1]]
    assert task["answers_scored"] == {"exact": 0, "mc": 2} and task["settings"]["mc_samples"] == 3000
