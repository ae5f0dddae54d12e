"""train_cpt.py and train_sft.py end to end: SIGKILL + --resume, torchrun, exports, bad inputs.

References: an uninterrupted run (resume), one process with the same global batch (torchrun),
transformers' ModernBertForMaskedLM and peft-layout adapters (exports), and for bad inputs
the rule "one sentence, exit status 2, no complete-looking output directory".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TURKISH_TEXT, make_model_dir, train_cpt_killed_and_full
from safetensors.torch import load_file

from minidiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_cpt  # noqa: E402
import train_sft  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--max-len", "48", "--lr", "3e-3", "--log-every", "1", "--no-progress"]
LORA_SMALL = ["--lora-r", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    model = make_model_dir(root / "model", seed=0)
    train = root / "train.txt"
    train.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")  # 12 documents
    rows = root / "sft.jsonl"
    with open(rows, "w", encoding="utf-8") as handle:
        for i in range(0, len(TURKISH_TEXT) - 1, 2):
            handle.write(json.dumps({"instruction": TURKISH_TEXT[i], "input": "", "output": TURKISH_TEXT[i + 1]},
                                    ensure_ascii=False) + "\n")
    return {"root": root, "model": model, "train": train, "rows": rows}


def run_script(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)


def assert_same_weights(a: Path, b: Path, atol: float = 0.0):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol == 0.0:
            assert torch.equal(wa[key], wb[key]), key
        else:
            assert torch.allclose(wa[key], wb[key], atol=atol, rtol=0), (key, (wa[key] - wb[key]).abs().max())


# ----------------------------------------------------------------------------- resume after SIGKILL

@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(setup, tmp_path):
    common = ["--model", str(setup["model"]), "--data", str(setup["train"]), *SMALL, *LORA_SMALL,
              "--batch-size", "3", "--grad-accum", "2", "--max-steps", "6", "--save-every", "2",
              "--keep-last", "5", "--loss-norm", "token", "--warmup", "2", "--eval-fraction", "0.25"]
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    # 2 micro-batches per step: hang while fetching step 6's first batch, after checkpoint 4
    train_cpt_killed_and_full(common, full_out, killed_out, tmp_path, env=ENV, hang_after=10)

    resumed = run_script(["train_cpt.py", *common, "--out", str(killed_out), "--resume"], timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(full_out / "model.safetensors", killed_out / "model.safetensors")
    assert_same_weights(full_out / "adapter" / "adapter_model.safetensors",
                        killed_out / "adapter" / "adapter_model.safetensors")
    # the exported LoRA run: merged weights == base + adapter (minidiff's loader and peft layout)
    from minidiff import load_model
    from minidiff.plumbing import peft_io

    merged = load_model(killed_out)
    # .eval(): apply_lora's new LoRALinear modules start in training mode (dropout on) even in an eval model
    adapted = peft_io.load_adapter(load_model(setup["model"]), killed_out / "adapter").eval()
    ids = torch.randint(5, merged.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-4)


# ----------------------------------------------------------------------------- torchrun --max-restarts

RESTART_HARNESS = """
import os, sys
from minidiff.data.batches import Batches
original = Batches.__next__
fetched = [0]
def next_or_die(self):
    fetched[0] += 1
    if fetched[0] > {die_after} and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(1)  # the first attempt dies as a killed process would
    return original(self)
Batches.__next__ = next_or_die
import train_cpt
from minidiff.errors import run_cli
sys.argv = ["train_cpt.py"] + {argv!r}
run_cli(train_cpt.main)
"""


@pytest.mark.slow
def test_torchrun_restart_with_resume_auto_equals_uninterrupted_run(setup, tmp_path):
    """torchrun --max-restarts reruns the same command line: --resume auto starts the first attempt
    afresh and continues the restarted one from its newest checkpoint."""
    common = ["--model", str(setup["model"]), "--data", str(setup["train"]), *SMALL, *LORA_SMALL,
              "--batch-size", "3", "--grad-accum", "2", "--max-steps", "6", "--save-every", "2", "--keep-last", "5"]
    full = subprocess.Popen([sys.executable, "train_cpt.py", *common, "--out", str(tmp_path / "full")], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "restarted"
    harness = tmp_path / "harness.py"
    # 2 micro-batches per step, one fetched ahead: the 11th fetch comes after the step-4 checkpoint
    harness.write_text(RESTART_HARNESS.format(die_after=10, argv=[*common, "--out", str(out), "--resume", "auto"]))
    restarted = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1",
                            str(harness)], timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert full.wait(timeout=300) == 0, full.stderr.read()
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("step-000004")
    assert_same_weights(tmp_path / "full" / "model.safetensors", out / "model.safetensors")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(setup, tmp_path):
    common = ["--model", str(setup["model"]), "--data", str(setup["train"]), *SMALL, *LORA_SMALL,
              "--max-steps", "4", "--loss-norm", "token", "--lora-dropout", "0.1"]
    one = subprocess.Popen([sys.executable, "train_cpt.py", *common, "--batch-size", "2", "--grad-accum", "2",
                            "--out", str(tmp_path / "one")], cwd=ROOT, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    two = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_cpt.py", *common,
                      "--batch-size", "2", "--grad-accum", "1", "--out", str(tmp_path / "two")], timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.wait(timeout=300) == 0, one.stderr.read()
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert_same_weights(tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors", atol=1e-5)
    one_loss = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_loss = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one_loss] == [r["step"] for r in two_loss]
    for a, b in zip(one_loss, two_loss):
        assert abs(a.get("loss", 0) - b.get("loss", 0)) < 1e-5


# ----------------------------------------------------------------------------- SFT export


def test_sft_run_exports_a_model_transformers_loads(setup, tmp_path):
    out = tmp_path / "sft"
    code = train_sft.main(["--model", str(setup["model"]), "--data", str(setup["rows"]), "--format", "alpaca",
                           "--out", str(out), "--max-len", "64", "--batch-size", "2", "--max-steps", "3",
                           "--lr", "1e-3", "--no-progress"])
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "run.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "adapter").exists()
    import transformers

    from minidiff import load_model

    ours = load_model(out)
    theirs = transformers.ModernBertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(5, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(input_ids=ids).logits, atol=1e-4)
    start = load_model(setup["model"])
    assert not torch.equal(start.head.dense.weight, ours.head.dense.weight)  # it did train


def test_sft_long_prompts_cut_are_counted_in_run_json(setup, tmp_path):
    """--long-prompts cut keeps exactly the rows the drop rule leaves out (the list oracle's count),
    and run.json says how many prompts were cut."""
    import data_oracle

    from minidiff.data.readers import read_rows
    from minidiff.data.tokenizer import load_tokenizer

    max_len = 48  # 4 of the 6 prompts fill it
    _, dropped = data_oracle.build_sft_examples(read_rows(setup["rows"]), "alpaca", load_tokenizer(setup["model"]),
                                                max_len)
    assert 0 < dropped.dropped_prompt_too_long < dropped.rows  # the test needs both kinds of row
    out = tmp_path / "cut"
    code = train_sft.main(["--model", str(setup["model"]), "--data", str(setup["rows"]), "--format", "alpaca",
                           "--out", str(out), "--max-len", str(max_len), "--long-prompts", "cut",
                           "--batch-size", "2", "--max-steps", "1", "--no-progress"])
    assert code == 0
    report = json.loads((out / "run.json").read_text())["data"]
    assert report["cut_prompt_too_long"] == dropped.dropped_prompt_too_long
    assert (report["kept"], report["dropped_prompt_too_long"]) == (dropped.rows, 0)


def help_text(script, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        script.main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_flag_and_the_presets(capsys):
    text = help_text(train_cpt, capsys)
    for flag in ("--max-len", "--pack", "--batch-size", "--grad-accum", "--lr", "--warmup", "--max-steps",
                 "--epochs", "--noise-schedule", "--loss-norm", "--stratified-t", "--save-every", "--eval-every",
                 "--eval-data", "--eval-fraction", "--seed", "--resume", "--from-scratch", "--full", "--lora-r"):
        assert flag in text, flag
    assert "diffutron-cpt" in text and "--epochs 4.0" in text
    sft = help_text(train_sft, capsys)
    assert "diffutron-sft1" in sft and "diffutron-sft2" in sft and "--format instructurca" in sft


def test_preset_fills_fields_and_flags_override():
    parser = train_cpt.train_cli.config_parser(train_cpt.CPTConfig, "x", "", {}, train_cpt.PRESETS)
    config, given = train_cpt.train_cli.parse_config(
        train_cpt.CPTConfig, parser, ["--preset", "diffutron-cpt", "--batch-size", "8"], train_cpt.PRESETS)
    assert (config.epochs, config.grad_accum, config.lora_r, config.batch_size) == (4.0, 2, 256, 8)
    assert given == {"preset", "batch_size"}


def test_noise_schedule_flag_sets_the_field():
    parser = train_cpt.train_cli.config_parser(train_cpt.CPTConfig, "x", "", {}, train_cpt.PRESETS)
    config, given = train_cpt.train_cli.parse_config(train_cpt.CPTConfig, parser, ["--noise-schedule", "cosine"], {})
    assert config.noise_schedule == "cosine" and given == {"noise_schedule"}
    config, _ = train_cpt.train_cli.parse_config(train_cpt.CPTConfig, parser, ["--preset", "diffutron-cpt"],
                                                 train_cpt.PRESETS)
    assert config.noise_schedule == "linear"


@pytest.mark.parametrize("script, config_class", [(train_cpt, "CPTConfig"), (train_sft, "SFTConfig")])
def test_resume_flag_is_true_auto_or_false(script, config_class):
    cls = getattr(script, config_class)
    parser = script.train_cli.config_parser(cls, "x", "", script.HELP, script.PRESETS)
    for argv, expected in (([], False), (["--resume"], True), (["--resume", "auto"], "auto"), (["--no-resume"], False),
                           (["--resume", "--seed", "3"], True)):
        assert script.train_cli.parse_config(cls, parser, argv, script.PRESETS)[0].resume == expected, argv
    with pytest.raises(UserError, match="--resume: invalid choice: 'yes'"):
        script.train_cli.parse_config(cls, parser, ["--resume", "yes"], script.PRESETS)


# ----------------------------------------------------------------------------- bad inputs


def cpt_args(setup, out, *extra):
    return ["--model", str(setup["model"]), "--data", str(setup["train"]), "--out", str(out), *SMALL,
            "--max-steps", "2", *extra]


def bad_cases(setup, tmp: Path):
    invalid = tmp / "invalid.txt"
    invalid.write_bytes(b"\xff\xfe bozuk\n\xc3\x28 satir\n")  # every line invalid UTF-8
    no_field = tmp / "nofield.jsonl"
    no_field.write_text('{"instruction": "Soru?", "input": ""}\n', encoding="utf-8")
    long_docs = tmp / "long.txt"
    long_docs.write_text(" ".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    m, t, r = str(setup["model"]), str(setup["train"]), str(setup["rows"])
    return {
        "missing file": (train_cpt, ["--model", m, "--data", str(tmp / "nope.txt")], "does not exist"),
        "wrong format": (train_sft, ["--model", m, "--data", r, "--format", "sharegpt"], "format"),
        "field absent": (train_sft, ["--model", m, "--data", str(no_field), "--format", "alpaca"], "output"),
        "invalid utf-8": (train_cpt, ["--model", m, "--data", str(invalid)], "no documents"),
        "all filtered": (train_cpt, ["--model", m, "--data", str(long_docs), "--max-len", "16"], "longer than --max-len"),
        "full with lora-r": (train_cpt, ["--model", m, "--data", t, "--full", "--lora-r", "8"], "--lora-r"),
        "lora-r without lora": (train_sft, ["--model", m, "--data", r, "--lora-r", "8"], "--lora-r"),
        "steps and epochs": (train_cpt, ["--model", m, "--data", t, "--max-steps", "3", "--epochs", "1"], "--epochs"),
        "resume without checkpoint": (train_cpt, ["--model", m, "--data", t, "--resume"], "no complete checkpoint"),
        "unknown flag": (train_cpt, ["--model", m, "--data", t, "--learning-rate", "1"], "unrecognized"),
        "missing model": (train_cpt, ["--model", str(tmp / "no-model"), "--data", t], "no-model"),
        "no data flag": (train_cpt, ["--model", m], "--data"),
        "bad schedule": (train_cpt, ["--model", m, "--data", t, "--noise-schedule", "cubic"], "--noise-schedule"),
    }


def test_bad_inputs_raise_one_sentence_and_leave_no_output(setup, tmp_path):
    for name, (script, argv, needle) in bad_cases(setup, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(UserError) as info:
            script.main([*argv, "--out", str(out), "--max-steps", "2", "--no-progress"]
                        if "--max-steps" not in argv and "--epochs" not in argv
                        else [*argv, "--out", str(out), "--no-progress"])
        message = str(info.value)
        assert needle in message, (name, message)
        assert "\n" not in message.strip(), (name, message)
        assert not out.exists(), name  # nothing written, let alone something that looks finished


def test_bad_input_exit_status_two_without_traceback(setup, tmp_path):
    result = run_script(["train_sft.py", "--model", str(setup["model"]), "--data", str(setup["rows"]),
                         "--format", "sharegpt", "--out", str(tmp_path / "x")])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_partly_invalid_utf8_is_reported_and_training_goes_on(setup, tmp_path, capsys):
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes("\n".join(TURKISH_TEXT).encode() + b"\n\xff\xfe bozuk satir\n")
    out = tmp_path / "run"
    assert train_cpt.main(["--model", str(setup["model"]), "--data", str(mixed), "--out", str(out), *SMALL,
                           "--max-steps", "1", "--batch-size", "4", *LORA_SMALL]) == 0
    err = capsys.readouterr().err
    assert f"{mixed}:13" in err and "skipped 1" in err
    assert (out / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_the_process_group_is_joined_after_the_data_is_ready(tmp_path, monkeypatch):
    """Under torchrun the scripts pick the device and rank at once but join the process group in
    the trainer only, so no collective's timeout runs while rank 0 tokenises a corpus."""
    import torch.distributed as dist

    def too_early(*args, **kwargs):
        raise AssertionError("the process group was joined before the data was prepared")

    monkeypatch.setattr(dist, "init_process_group", too_early)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    argv = ["--from-scratch", "x/config.json", "--full", "--data", "d.txt", "--out", str(tmp_path / "run"),
            "--device", "cpu"]
    config, ctx = train_cpt.train_cli.start(train_cpt.CPTConfig, "train_cpt.py", "", {}, train_cpt.PRESETS,
                                            lambda config, given: None, argv)
    assert (ctx.rank, ctx.world_size, ctx.device) == (1, 2, torch.device("cpu"))
    assert not dist.is_initialized()
