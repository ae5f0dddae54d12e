"""demo.py end to end at a microscopic scale, on local stand-in corpora (no network).

The real corpora come from PyPI (tests/test_corpora.py covers their parsing); here
`fetch_demo_corpora` is replaced by a function returning Turkish sentences from the test
helpers, and the demo must run every stage and write a coherent summary.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import TURKISH_TEXT

from minidiff.data import corpora
from minidiff.data.tokenizer import train_tokenizer
from minidiff.errors import UserError
from minidiff.evaluation import infilling

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
        "--new-tokens", "8", "--infill-snippets", "8", "--no-progress"]


def check_infill(infill: dict, out: Path, printed: str) -> None:
    """The infilling table and its example, as the tiny demo wrote them."""
    assert [row["masking"] for row in infill["rows"]] == [name for name, _, _ in infilling.MASKINGS]
    assert infill["snippets"] >= 1 and infill["skipped_snippets"] >= 0
    for row in infill["rows"]:
        assert row["masked_chars"] >= infill["snippets"]  # at least one per snippet
        assert all(0 <= row[k] <= 1 for k in ("most_frequent", "bigram", "model_one_step", "model"))
    assert "| masking | masked characters |" in printed and "bigram, both neighbours" in printed
    example = infill["example"]
    frames, masked, text = example["frames"], example["masked"], example["text"]
    # one character per step: frame k has len(masked) - k masks, only where the text was masked
    assert [f.count(infilling.MASK_SHOWN) for f in frames] == list(range(len(masked), -1, -1))
    given = [i for i in range(len(text)) if i not in set(masked)]
    assert all(frame[i] == text[i] for frame in frames for i in given)  # the given text stays
    assert frames[-1] == example["filled"]
    assert example["correct"] == sum(text[i] == frames[-1][i] for i in masked)
    assert re.search("original +" + re.escape(text), printed)
    page = (out / "infill_trace.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '"steps": %d' % len(masked) in page


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
    check_infill(summary["infill"], out, printed)
    assert (summary["picture"] == "demo.png") == (importlib.util.find_spec("matplotlib") is not None)
    assert (out / "demo.png").exists() == (summary["picture"] is not None)
    # the held-out speeches are not in the training file
    train = (out / "data" / "speeches_train.jsonl").read_text()
    for line in (out / "data" / "speeches_heldout.jsonl").read_text().splitlines():
        assert json.loads(line)["text"] not in train
    with pytest.raises(UserError, match="finished demo"):
        demo.main(["--out", str(out), *TINY])


# ----------------------------------------------------------------------------- infilling: baselines and scoring


def test_bigram_fill_by_hand():
    # "abab": n(ab) = 2, n(ba) = 1, n(a.) = 2, n(b.) = 1, A = 2, add-one:
    # P(a|a) = 1/4, P(b|a) = 3/4, P(a|b) = 2/3, P(b|b) = 1/3; P(a) = P(b) = (2 + 1) / (4 + 2) = 1/2
    bigram = infilling.CharBigram(["abab"])
    assert bigram.chars == ["a", "b"]
    assert np.allclose(bigram.transition, [[1 / 4, 3 / 4], [2 / 3, 1 / 3]])
    assert np.allclose(bigram.unigram, [1 / 2, 1 / 2])
    # "abab_": left b, no right: P(a|b) = 2/3 > P(b|b) = 1/3
    assert infilling.CharBigram(["abab"]).fill("ababb", [4]) == "ababa"
    # "a_b": P(a|a) P(b|a) = 3/16 < P(b|a) P(b|b) = 4/16
    assert bigram.fill("aab", [1]) == "abb"
    # "ab_a": P(a|b) P(a|a) = 2/3 * 1/4 = 1/6 < P(b|b) P(a|b) = 1/3 * 2/3 = 2/9: the right side decides
    assert bigram.fill("abaa", [2]) == "abba"
    # "_b": no left neighbour: P(a) P(b|a) = 3/8 > P(b) P(b|b) = 1/6
    assert bigram.fill("bb", [0]) == "ab"
    # "a__a": the four fills weigh aa 1/64, ab 8/64, ba 8/64, bb 32/192; each position's marginal: b
    assert bigram.fill("aaaa", [1, 2]) == "abba"


def test_bigram_posterior_equals_enumeration():
    rng = random.Random(0)
    texts = ["".join(rng.choice("abc") for _ in range(40)) for _ in range(3)]
    bigram = infilling.CharBigram(texts, alphabet="d")  # "d" never seen: smoothing alone
    chars = bigram.chars
    pairs = Counter((t[i], t[i + 1]) for t in texts for i in range(len(t) - 1))
    firsts = Counter(c for t in texts for c in t[:-1])

    def p(c, given):  # (n(given c) + 1) / (n(given .) + A), counted here afresh
        return (pairs[(given, c)] + 1) / (firsts[given] + len(chars))

    for left, right in (("a", "c"), (None, "b"), ("b", None)):
        weights = {}
        for fill in itertools.product(chars, repeat=3):
            if left is None:
                unigram = Counter(c for t in texts for c in t)
                w = (unigram[fill[0]] + 1) / (sum(unigram.values()) + len(chars))
            else:
                w = p(fill[0], left)
            w *= p(fill[1], fill[0]) * p(fill[2], fill[1]) * (p(right, fill[2]) if right else 1.0)
            weights[fill] = w
        total = sum(weights.values())
        expected = np.array([[sum(w for f, w in weights.items() if f[k] == c) / total for c in chars]
                             for k in range(3)])
        index = bigram.index
        got = bigram.posterior(3, None if left is None else index[left], None if right is None else index[right])
        assert np.allclose(got, expected, rtol=1e-12)


def test_most_frequent_character_and_accuracy():
    assert infilling.most_frequent_character(["ab a", "ca"]) == "a"
    # masked positions 1, 2 of "abc" and 0 of "xy": "abd" gets 1 of 2, "xy" 1 of 1 -> 2 of 3
    assert infilling.masked_accuracy(["abc", "xy"], ["abd", "xz"], [[1, 2], [0]]) == pytest.approx(2 / 3)


def test_masks_characters_and_whole_words():
    text = "Bu, yeni bir gün: 1923 yılı."
    masked = infilling.mask_characters(text, 0.3, random.Random(1))
    assert len(masked) == round(0.3 * len(text)) == len(set(masked))
    words = infilling.mask_words(text, 0.5, random.Random(1))
    spans = [range(*m.span()) for m in re.finditer(r"\w+", text)]
    chosen = [s for s in spans if s[0] in words]
    assert len(chosen) == 3  # round(0.5 * 6)
    assert sorted(i for s in chosen for i in s) == words  # whole words, nothing else
    assert infilling.mask_words("... !", 0.5, random.Random(1)) == []


def test_snippets_cut_at_words_and_one_token_per_character(tmp_path):
    text = "Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu. " * 3
    pieces = infilling.cut_snippets([text, "kısa"], 40)
    assert pieces and all(infilling.MIN_SNIPPET <= len(p) <= 40 for p in pieces)
    full, joined = " ".join(text.split()), " ".join(pieces)
    # nothing lost but a last piece shorter than MIN_SNIPPET ("başkenti Ankara oldu.") and "kısa"
    assert full.startswith(joined) and 0 < len(full[len(joined):].strip()) < infilling.MIN_SNIPPET
    tok = train_tokenizer(TURKISH_TEXT, 300)
    ids = infilling.character_ids(tok)
    snippet = infilling.as_snippet(tok, "Ankara oldu.", ids)
    assert snippet is not None and snippet.offset == 1
    assert [tok.decode([i]) for i in snippet.ids[1:]] == [c if c != " " else "" for c in "Ankara oldu."]
    assert infilling.as_snippet(tok, "Ankara € oldu", ids) is None  # "€" is three byte tokens
