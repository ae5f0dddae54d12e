"""demo.py end to end at a microscopic scale, on local stand-in corpora (no network).

The real corpora come from PyPI (tests/test_corpora.py covers their parsing); here
`fetch_demo_corpora` is replaced by a function returning Turkish sentences from the test
helpers, and the demo must run every stage and write a coherent summary.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from helpers import TURKISH_TEXT
from minidiff import corpora
from minidiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402


def stand_in_corpora(tmp_path: Path):
    speeches = [" ".join(TURKISH_TEXT[i:] + TURKISH_TEXT[:i]) for i in range(len(TURKISH_TEXT))]
    rows = [{"messages": [{"role": "user", "content": " ".join(TURKISH_TEXT[i].split()[:3])},
                          {"role": "assistant", "content": " ".join(TURKISH_TEXT[i + 1].split()[:4])}],
             "source": "local"}
            for i in range(len(TURKISH_TEXT) - 1)]
    speeches_path, rows_path = tmp_path / "speeches.jsonl", tmp_path / "instructions.jsonl"
    speeches_path.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in speeches))
    rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return corpora.DemoCorpora(speeches=speeches, instructions=rows, speeches_path=speeches_path,
                               instructions_path=rows_path, sources="local test sentences")


TINY = ["--vocab-size", "300", "--hidden-size", "32", "--num-layers", "2", "--intermediate-size", "48",
        "--max-len", "32", "--sft-max-len", "64", "--block-length", "4", "--held-out-chars", "300", "--cpt-steps", "6", "--cpt-batch-size", "4",
        "--sft-epochs", "1", "--sft-batch-size", "4", "--sft-held-out", "2", "--samples", "3",
        "--new-tokens", "8", "--no-progress"]


def test_demo_runs_every_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora, "fetch_demo_corpora", lambda cache_dir=None: stand_in_corpora(tmp_path))
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("init", "after_cpt", "after_sft"):
        assert math.isfinite(summary["perplexity"][stage]["perplexity"])
    assert len(summary["samples"]) == 3 and summary["samples"][0]["held_out"]
    assert all(isinstance(s["answer"], str) for s in summary["samples"])
    for name in ("cpt", "sft"):
        assert (out / name / "model.safetensors").exists() and (out / name / "tokenizer.json").exists()
    assert summary["held_out_speeches"] >= 1 and summary["train_speeches"] >= 1
    printed = capsys.readouterr().out
    assert "MLM perplexity" in printed and "after pre-training" in printed
    # the held-out speeches are not in the training file
    train = (out / "data" / "speeches_train.jsonl").read_text()
    for line in (out / "data" / "speeches_heldout.jsonl").read_text().splitlines():
        assert json.loads(line)["text"] not in train
    with pytest.raises(UserError, match="finished demo"):
        demo.main(["--out", str(out), *TINY])
