"""Fault injection for training runs: every failure a long run can meet, made to happen here.

Each case ends one of two ways, and the test checks which:
- recovered: the run continues from the newest checkpoint that verifies and ends bitwise equal
  to an uninterrupted run (the reference: the same run with no fault);
- refused: one sentence (a UserError; exit status 2 from a script) and nothing written that
  looks finished.
Crash points are enumerated by the test (every file operation of a checkpoint save, SQLite's
standard of testing each one), not left to the timing of a signal. The SIGKILL end-to-end
resume lives in tests/test_train_scripts.py; damaged token shards in tests/test_shard_faults.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import MASK, TURKISH_TEXT, cpt_batches, make_model_dir, make_tokenizer_dir, tiny_model
from safetensors.torch import load_file

from minidiff.data.tokenizer import load_tokenizer
from minidiff.errors import UserError
from minidiff.plumbing import files
from minidiff.training import state as train_state
from minidiff.training import trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_cpt  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STEPS = 6


class Crash(BaseException):
    """A process dying: nothing in the code under test catches it."""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def batches(tok):
    return cpt_batches(tok)


def config(**kw):
    base = dict(lr=3e-3, max_steps=STEPS, batch_size=3, grad_accum=2, clip=1.0, log_every=1, progress=False,
                seed=0, save_every=2, keep_last=5)
    return trainer.TrainConfig(**{**base, **kw})


LOSS = trainer.nelbo_objective(MASK)


def run(tok, out, cfg=None, loss_fn=LOSS, model_seed=0):
    return trainer.train(tiny_model(model_seed, vocab_size=tok.vocab_size), batches(tok), None, loss_fn,
                         cfg or config(), out)


def dying_after(step: int, cfg=None):
    """A loss that raises Crash on the first micro-batch of optimizer step `step` + 1."""
    cfg = cfg or config()
    calls = {"n": 0}

    def loss_fn(model, batch, generator):
        calls["n"] += 1
        if calls["n"] > step * cfg.grad_accum:
            raise Crash()
        return LOSS(model, batch, generator)

    return loss_fn


@pytest.fixture(scope="module")
def reference(tok, tmp_path_factory):
    """The uninterrupted run's final weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(tok, out)
    return load_file(str(out / "model.safetensors"))


def crashed_run(tok, out, after_step=5, cfg=None):
    with pytest.raises(Crash):
        run(tok, out, cfg, loss_fn=dying_after(after_step, cfg))
    assert not (out / "model.safetensors").exists()


def resume_and_compare(tok, out, reference, cfg=None, mode=True):
    run(tok, out, replace(cfg or config(), resume=mode))
    final = load_file(str(out / "model.safetensors"))
    assert final.keys() == reference.keys()
    for key in final:
        assert torch.equal(final[key], reference[key]), key


# ----------------------------------------------------------------------------- damaged checkpoints


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


DAMAGE = {
    "truncated weights": lambda c: truncate(c / "trainable.safetensors"),
    "same-size change in the weights": lambda c: flip_byte(c / "trainable.safetensors"),
    "truncated optimizer": lambda c: truncate(c / "optimizer.pt"),
    "garbage state.json": lambda c: (c / "state.json").write_text("{not json"),
    "missing random states": lambda c: (c / "rng-rank-0.pt").unlink(),
    "no manifest": lambda c: (c / "checkpoint.json").unlink(),
    "garbage manifest": lambda c: (c / "checkpoint.json").write_bytes(b"\x00\x01garbage"),
    "an extra file": lambda c: (c / "stray.bin").write_bytes(b"x"),
}


def resumed_from(out: Path):
    return json.loads((out / "run.json").read_text())["resumed_from"]


@pytest.mark.parametrize("damage, mode", [*((d, True) for d in sorted(DAMAGE)),
                                          ("same-size change in the weights", "auto")])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tok, tmp_path, reference, damage, mode, capsys):
    out = tmp_path / "run"
    crashed_run(tok, out)  # checkpoints at steps 2 and 4
    DAMAGE[damage](out / "checkpoints" / "step-000004")
    assert train_state.verify_checkpoint(out / "checkpoints" / "step-000004") is not None
    assert train_state.verify_checkpoint(out / "checkpoints" / "step-000002") is None
    resume_and_compare(tok, out, reference, mode=mode)
    assert resumed_from(out).endswith("step-000002")
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "step-000004" in skipped[0]


@pytest.mark.parametrize("mode", [True, "auto"])
def test_every_checkpoint_damaged_is_one_sentence(tok, tmp_path, mode):
    """--resume auto too: checkpoints exist but none verifies, so a restart must not start over."""
    out = tmp_path / "run"
    crashed_run(tok, out)
    for step in (2, 4):
        truncate(out / "checkpoints" / f"step-00000{step}" / "trainable.safetensors")
    with pytest.raises(UserError, match="step-000004, step-000002.* all damaged") as info:
        run(tok, out, config(resume=mode))
    assert "\n" not in str(info.value)
    assert not (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- --resume auto (torchrun restarts)


def test_resume_auto_on_an_empty_folder_starts_fresh(tok, tmp_path, reference):
    out = tmp_path / "run"
    resume_and_compare(tok, out, reference, mode="auto")
    assert resumed_from(out) is None


def test_resume_auto_continues_a_crashed_run_bitwise(tok, tmp_path, reference):
    out = tmp_path / "run"
    crashed_run(tok, out, cfg=config(resume="auto"))  # started fresh, died after its step-4 checkpoint
    assert resumed_from(out) is None
    resume_and_compare(tok, out, reference, mode="auto")
    assert resumed_from(out).endswith("step-000004")


# ----------------------------------------------------------------------------- crash points of a save


class CrashAt:
    """Counts the file operations of the checkpoint save of step `step` (random states, weights,
    optimizer, each rename, each deletion) and raises Crash at operation number `at` (None:
    only count)."""

    def __init__(self, monkeypatch, step: int, at: int | None):
        self.step, self.at, self.count, self.active = step, at, 0, False
        begin = train_state.begin_checkpoint

        def begin_checkpoint(root, s):
            self.active = s == self.step
            return begin(root, s)

        monkeypatch.setattr(train_state, "begin_checkpoint", begin_checkpoint)
        for owner, name in [(train_state, "save_file"), (train_state.torch, "save"), (os, "replace"),
                            (train_state.shutil, "rmtree")]:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, operation):
        def wrapped(*args, **kwargs):
            if self.active:
                self.count += 1
                if self.count == self.at:
                    raise Crash()
            return operation(*args, **kwargs)

        return wrapped


def test_a_crash_at_every_point_of_a_save_recovers_bitwise(tok, tmp_path, reference, monkeypatch):
    cfg = config(keep_last=1)  # the save of step 4 also deletes step 2's
    with monkeypatch.context() as patch:
        counter = CrashAt(patch, step=4, at=None)
        run(tok, tmp_path / "count", cfg)
    operations = counter.count
    assert operations >= 7  # rng, weights, optimizer, state.json rename, manifest rename, publish, prune
    for at in range(1, operations + 1):
        out = tmp_path / f"crash-{at}"
        with monkeypatch.context() as patch:
            CrashAt(patch, step=4, at=at)
            with pytest.raises(Crash):
                run(tok, out, cfg)
        resume_and_compare(tok, out, reference, cfg)
        assert not list((out / "checkpoints").glob(".tmp-*")), at  # the killed save's leftovers are gone


# ----------------------------------------------------------------------------- metrics, temporaries


def test_partial_last_metrics_line_is_cut_with_a_warning(tok, tmp_path, reference, capsys):
    out = tmp_path / "run"
    crashed_run(tok, out)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 5, "lo')  # what a crash during an append leaves
    resume_and_compare(tok, out, reference)
    assert "1 unreadable line(s) dropped" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_stale_temporaries_are_removed_at_start(tok, tmp_path, reference):
    out = tmp_path / "run"
    crashed_run(tok, out)
    (out / "checkpoints" / ".tmp-step-000006").mkdir()
    (out / "checkpoints" / ".tmp-step-000006" / "trainable.safetensors").write_bytes(b"half")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"{files.TEMPORARY_MARK}model.safetensors-{files.writer_id(int(dead.stdout))}"
    stale.write_bytes(b"half a model")
    resume_and_compare(tok, out, reference)
    assert not stale.exists() and not (out / "checkpoints" / ".tmp-step-000006").exists()


def test_checkpoints_by_default(tok, tmp_path):
    assert trainer.TrainConfig().save_every == 1000 and trainer.TrainConfig().keep_last == 2
    out = tmp_path / "run"
    trainer.train(tiny_model(0, vocab_size=tok.vocab_size), batches(tok), None, LOSS,
                  trainer.TrainConfig(max_steps=3, batch_size=3, progress=False), out)
    assert [s for s, _ in train_state.list_checkpoints(out / "checkpoints")] == [3]  # the end of the run
    result = subprocess.run([sys.executable, "train_cpt.py", "--preset", "diffutron-cpt", "--help"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True)
    preset = result.stdout.split("diffutron-cpt:")[1]
    assert "--save-every 1000" in preset and "--keep-last 2" in preset


# ----------------------------------------------------------------------------- another run's checkpoint


def test_resume_on_another_base_model_of_the_same_shape_is_refused(tok, tmp_path):
    out = tmp_path / "run"
    crashed_run(tok, out)
    with pytest.raises(UserError, match="another base model"):
        run(tok, out, config(resume=True), model_seed=1)
    assert not (out / "model.safetensors").exists()


@pytest.fixture(scope="module")
def script_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    model = make_model_dir(root / "model", seed=0)
    train = root / "train.txt"
    train.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    other = root / "other.txt"  # the same number of documents, other text
    other.write_text("\n".join(reversed(TURKISH_TEXT)) + "\n", encoding="utf-8")
    other_tok = make_tokenizer_dir(root / "other-tok", vocab_size=290)  # other merges
    return {"model": model, "train": train, "other": other, "other_tok": other_tok}


def script_args(s, out, *extra, data=None):
    return ["--model", str(s["model"]), "--data", str(data or s["train"]), "--out", str(out), "--max-len", "48",
            "--lr", "3e-3", "--no-progress", "--max-steps", "4", "--save-every", "2", "--batch-size", "4",
            "--lora-r", "4", "--lora-alpha", "8", *extra]


def interrupted_script_run(s, out):
    """A train_cpt.py run whose export was lost: its checkpoints are all that is left."""
    assert train_cpt.main(script_args(s, out)) == 0
    (out / "model.safetensors").unlink()


def test_resume_on_other_data_tokenizer_or_lora_rank_is_one_sentence(script_setup, tmp_path):
    s, out = script_setup, tmp_path / "run"
    interrupted_script_run(s, out)
    cases = {
        "data": (script_args(s, out, "--resume", data=s["other"]), "another data"),
        "tokenizer": (script_args(s, out, "--resume", "--tokenizer", str(s["other_tok"])), "another tokenizer"),
        "lora rank": ([*script_args(s, out, "--resume"), "--lora-r", "8"], "--lora-r is 8 but"),
        "max len": ([*script_args(s, out, "--resume"), "--max-len", "40"], "--max-len is 40 but"),
    }
    for name, (argv, needle) in cases.items():
        with pytest.raises(UserError) as info:
            train_cpt.main(argv)
        assert needle in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
        assert not (out / "model.safetensors").exists(), name
    # a deliberate change of data is allowed when asked for
    assert train_cpt.main(script_args(s, out, "--resume", "--allow-data-change", data=s["other"])) == 0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["identity"]["data"]["train"] and run_json["identity"]["tokenizer"]


def test_a_second_run_into_a_locked_out_is_refused(script_setup, tmp_path):
    out = tmp_path / "run"
    with files.lock_directory(out, "--out"):  # what the first run holds while it trains
        (out / "metrics.jsonl").write_text("")
        with pytest.raises(UserError, match="in use by another run"):
            train_cpt.main(script_args(script_setup, out))
        assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]  # nothing written


def test_lock_is_released_when_the_run_ends(tok, tmp_path):
    out = tmp_path / "run"
    crashed_run(tok, out)  # a crashed run does not leave its --out locked
    with files.lock_directory(out, "--out"):
        pass


# ----------------------------------------------------------------------------- non-finite training


@pytest.mark.parametrize("flag, value, needle", [
    ("--lr", "inf", "--lr must be a finite"), ("--lr", "nan", "--lr must be a finite"),
    ("--min-lr", "1", "--min-lr 1.0 is above --lr"), ("--beta2", "1.0", "--beta2 must lie in [0, 1)"),
    ("--adam-eps", "-1", "--adam-eps must be a finite"), ("--clip", "inf", "--clip must be a finite"),
    ("--weight-decay", "nan", "--weight-decay must be a finite"),
])
def test_bad_optimizer_settings_are_one_sentence(script_setup, tmp_path, flag, value, needle):
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train_cpt.main([*script_args(script_setup, out), flag, value])
    assert needle in str(info.value), str(info.value)
    assert not out.exists()


def test_max_len_beyond_the_models_context_is_one_sentence(script_setup, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--max-len 600 exceeds the model's context of 512 positions"):
        train_cpt.main([*script_args(script_setup, out), "--max-len", "600"])  # the tiny model: 512
    assert not out.exists()


def test_lr_inf_from_the_command_line_exits_2(script_setup, tmp_path):
    result = subprocess.run([sys.executable, "train_cpt.py", *script_args(script_setup, tmp_path / "run"),
                             "--lr", "inf"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")


def test_non_finite_weights_are_never_saved_or_exported(tok, tmp_path, monkeypatch):
    step = trainer.optim.AdamW.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):  # finite loss and gradients, then a weight overflows
        result = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(trainer.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="weights became non-finite"):
        run(tok, out, config(save_every=1))
    assert [s for s, _ in train_state.list_checkpoints(out / "checkpoints")] == [1, 2]
    assert not (out / "model.safetensors").exists()
