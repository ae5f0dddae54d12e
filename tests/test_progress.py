"""minidiff.plumbing.progress: tqdm in a terminal, plain timed lines elsewhere, nothing when disabled.

The terminal case is checked against tqdm itself (the bar is a tqdm and writes carriage returns);
the log case against lines counted by hand from a fake clock; and the trainer end to end: a
short run whose stderr is not a terminal writes lines, never a carriage return.
"""
from __future__ import annotations

import io

import data_oracle as oracle
from helpers import MASK, TURKISH_TEXT, make_tokenizer_dir, tiny_model
from tqdm import tqdm as tqdm_class

from minidiff.data.batches import Batches, collate_cpt
from minidiff.data.tokenizer import load_tokenizer, tokenize_documents
from minidiff.plumbing import progress
from minidiff.training import trainer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_output_is_one_line_per_interval_and_a_last_line():
    out, clock = io.StringIO(), FakeClock()
    bar = progress.LineProgress(total=100, desc="train", file=out, interval=5.0, clock=clock)
    for step in range(100):  # one update per simulated second: lines at t = 5, 10, ..., 100
        clock.now = step + 1.0
        if step == 49:
            bar.set_postfix(loss="1.2345")
        bar.update(1)
    bar.close()  # n = 100 was just printed: no extra line
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 20  # 100 s / 5 s
    assert lines[0] == "train: 5/100 it"
    assert lines[9] == "train: 50/100 it [loss=1.2345]"
    assert lines[-1] == "train: 100/100 it [loss=1.2345]"


def test_close_does_not_repeat_a_line_just_printed():
    out, clock = io.StringIO(), FakeClock()
    bar = progress.LineProgress(total=2, desc="x", file=out, interval=1.0, clock=clock)
    clock.now = 2.0
    bar.update(2)  # printed here
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == ["x: 2/2 it"]


def test_wrapping_an_iterable_yields_every_item_and_ends_with_a_line():
    out = io.StringIO()
    items = list(progress.bar(range(0, 10, 3), desc="perplexity", file=out))
    assert items == [0, 3, 6, 9]
    assert out.getvalue().splitlines() == ["perplexity: 4/4 it"]  # < interval: only the last line


def test_terminal_gets_tqdm_and_disable_prints_nothing():
    term = Terminal()
    bar = progress.bar(total=3, desc="t", file=term)
    assert isinstance(bar, tqdm_class)
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue()
    quiet = io.StringIO()
    bar = progress.bar(total=3, desc="q", file=quiet, disable=True)
    bar.update(3)
    bar.write("eval")
    bar.close()
    assert list(progress.bar([1, 2], disable=True, file=quiet)) == [1, 2]
    assert quiet.getvalue() == ""


def test_trainer_progress_into_a_log_has_no_carriage_returns(tmp_path, capfd):
    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok"))
    ids = tokenize_documents(TURKISH_TEXT, tok)
    examples = oracle.cpt_examples(ids, 48, "drop", eos_id=tok.eos_id, bos_id=tok.bos_id)
    batches = Batches(examples, 4, seed=0, collate=lambda b: collate_cpt(b, tok.pad_id))
    cfg = trainer.TrainConfig(lr=3e-3, max_steps=3, batch_size=4, log_every=1, progress=True, seed=0)
    trainer.train(tiny_model(0, vocab_size=tok.vocab_size), batches, None, trainer.nelbo_objective(MASK),
                  cfg, tmp_path / "run")
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "train: 3/3 it" in err
