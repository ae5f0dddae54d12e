"""The CETVEL multiple-choice tasks Diffutron reports (arXiv 2603.20466, Table 4), as data.

A task is a row -> (prompt, choices, label) renderer plus its hub source and metrics, following
CETVEL's lm-evaluation-harness task files (KUIS-AI/CETVEL, state of 2025-07-29), which also ship in
`LM_EVAL_TASK_DIR` (the tests check both render every row identically). Metrics: acc and acc_norm;
IronyTR adds f1 (binary, of "Evet"), News_Cat macro_f1 (CETVEL's utils.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from minidiff.errors import UserError

# the lm-eval task files of the 7 tasks (pass as include_path / --include_path)
LM_EVAL_TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
IRONY_CHOICES = ("Hayır", "Evet")
NEWS_CHOICES = ("spor", "magazin", "siyaset", "sağlık", "ekonomi")
# the hub dataset's English label names, in choice order (CETVEL's utils.py maps them to 0..4)
NEWS_LABELS = ("sport", "magazine", "politics", "health", "economy")
NLI_CHOICES = ("TUTARLI", "ALAKASIZ", "ÇELİŞKİLİ")  # entailment 0, neutral 1, contradiction 2
NO_GOLD = -1  # nli_tr's label of a pair its annotators did not agree on
STS_CHOICES = ("Benzerlik Yok", "Düşük Benzerlik", "Orta Benzerlik", "Yüksek Benzerlik",
               "Çok Yüksek Benzerlik", "Mantıksal Olarak Aynı")
XCOPA_CONNECTORS = {"cause": "çünkü", "effect": "bu yüzden"}


@dataclass(frozen=True)
class Example:
    """One multiple-choice item; label NO_GOLD (MNLI_TR) counts wrong for every metric."""

    prompt: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskDef:
    """A multiple-choice benchmark as data (see docs/evaluation.md)."""

    name: str                       # --task name
    title: str                      # row name in the table (the paper's spelling)
    hub: str                        # hub dataset id, config, split (for the record)
    hub_uri: str                    # what readers.read_rows is given when no file is passed
    required: tuple[str, ...]       # columns every row must have
    render: Callable[[dict], Example]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    paper: tuple[float, float] | None = None  # (Diffutron 2nd stage, best baseline), acc x 100


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"column {key!r} should hold text, got {type(value).__name__} {value!r}")
    return value


def _index(value, choices: Sequence[str], key: str) -> int:
    """A label as a choice index: an int, a digit string (CSV), or the choice's own text."""
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            value = int(text)
        elif text.casefold() in (names := [c.casefold() for c in choices]):
            return names.index(text.casefold())
    if isinstance(value, int) and 0 <= value < len(choices):
        return value
    raise UserError(f"label {key!r} = {value!r} is not one of the {len(choices)} choices "
                    f"(expected an index 0..{len(choices) - 1} or one of {list(choices)})")


def render_belebele(row: dict) -> Example:
    answers = [_text(row, f"mc_answer{i}") for i in (1, 2, 3, 4)]
    prompt = (f"P: {_text(row, 'flores_passage')}\nQ: {_text(row, 'question').strip()}\n"
              + "".join(f"{letter}: {a}\n" for letter, a in zip("ABCD", answers)) + "Answer:")
    raw = row["correct_answer_num"]
    number = str(raw).strip()
    if number not in ("1", "2", "3", "4"):
        raise UserError(f"label 'correct_answer_num' = {raw!r} is not one of 1, 2, 3, 4")
    return Example(prompt, ("A", "B", "C", "D"), int(number) - 1)


def render_belebele_cetvel(row: dict) -> Example:
    """The Turkish template of CETVEL's belebele_tr.yaml before 2024-12-10 (since: `render_belebele`'s)."""
    example = render_belebele(row)
    head, _, rest = example.prompt.partition("\nQ: ")
    question, _, answers = rest.partition("\n")
    prompt = f"Paragraf: {head[3:]}\nSoru: {question}\n{answers[:-len('Answer:')]}Cevap:"
    return Example(prompt, example.choices, example.label)


def render_exams(row: dict) -> Example:
    """CETVEL's rule for an answerKey missing from the labels (corrupted rows) is kept: index 3."""
    question = row["question"]
    if not isinstance(question, dict) or "stem" not in question or "choices" not in question:
        raise UserError("column 'question' should be an object with 'stem' and 'choices' "
                        "({'text': [...], 'label': [...]}) as in the exams dataset")
    texts, labels = question["choices"].get("text"), question["choices"].get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
        raise UserError("column 'question.choices' should hold equal-length lists 'text' and 'label'")
    key = str(row["answerKey"]).lstrip()
    label = labels.index(key) if key in labels else 3
    if label >= len(texts):
        raise UserError(f"label 'answerKey' = {row['answerKey']!r} is not one of {labels}")
    return Example(str(question["stem"]), tuple(str(t) for t in texts), label)


def render_irony(row: dict) -> Example:
    prompt = f"Cümle: {_text(row, 'text')}\nSoru: Bu cümlede ironi var mı?\n"
    return Example(prompt, IRONY_CHOICES, _index(row["label"], IRONY_CHOICES, "label"))


def render_news(row: dict) -> Example:
    """label: an index 0..4, an English name (NEWS_LABELS) or the Turkish choice itself."""
    prompt = f"Cümle: {_text(row, 'text')}\nSoru: Bu cümlenin konusu nedir?\n Cevap:"
    label = row["label"]
    if isinstance(label, str) and label.strip().casefold() in NEWS_LABELS:
        label = NEWS_LABELS.index(label.strip().casefold())
    return Example(prompt, NEWS_CHOICES, _index(label, NEWS_CHOICES, "label"))


def _two_sentences(row: dict, first: str, second: str, question: str) -> str:
    """The prompt MNLI_TR and STS_TR share: two quoted sentences, then the question."""
    return (f"Aşağıda iki cümle verilmektedir:\n\nCümle 1: \"{_text(row, first)}\"\n"
            f"Cümle 2: \"{_text(row, second)}\"\n\n{question}")


def render_mnli(row: dict) -> Example:
    """Label 0..2, or -1 (no gold label) kept as lm-eval keeps it: it matches no choice, so counts wrong."""
    prompt = _two_sentences(row, "premise", "hypothesis", "Bu iki cümle arasındaki ilişki nedir:")
    if str(row["label"]).strip() == str(NO_GOLD):
        return Example(prompt, NLI_CHOICES, NO_GOLD)
    return Example(prompt, NLI_CHOICES, _index(row["label"], NLI_CHOICES, "label"))


def sts_bin(score: float) -> int:
    """The 0-5 similarity score in six bins: [0, .5) [.5, 1.5) [1.5, 2.5) [2.5, 3.5) [3.5, 4.5) [4.5, 5]."""
    return min(5, max(0, math.floor(score + 0.5)))


def render_sts(row: dict) -> Example:
    prompt = _two_sentences(row, "sentence1", "sentence2", "Bu iki cümle arasında ne kadar benzerlik vardır:")
    try:
        score = float(row["score"])
    except (TypeError, ValueError):
        raise UserError(f"column 'score' should be a number in 0..5, got {row['score']!r}") from None
    if not 0.0 <= score <= 5.0:
        raise UserError(f"column 'score' = {score} is outside the 0..5 similarity range")
    return Example(prompt, STS_CHOICES, sts_bin(score))


def render_xcopa(row: dict) -> Example:
    """lm-eval's xcopa_tr."""
    question = _text(row, "question")
    if question not in XCOPA_CONNECTORS:
        raise UserError(f"column 'question' = {question!r} should be 'cause' or 'effect'")
    premise = _text(row, "premise").strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    choices = tuple(c[:1].lower() + c[1:] for c in (_text(row, "choice1"), _text(row, "choice2")))
    return Example(f"{premise} {XCOPA_CONNECTORS[question]}", choices, _index(row["label"], choices, "label"))


def render_generic(row: dict) -> Example:
    """A user task: {"prompt": str, "choices": [str, ...], "label": int}."""
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError("column 'choices' should be a list of at least two strings")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"label {label!r} is not an index into the {len(choices)} choices")
    return Example(_text(row, "prompt"), tuple(choices), label)


F1 = ("acc", "acc_norm", "macro_f1")  # News_Cat (and the default of mc_metrics)
IRONY_METRICS = ("acc", "acc_norm", "f1")  # f1: binary, of label 1 ("Evet"), lm-eval's f1
# hub, hub_uri and required columns of both Belebele tasks
BELEBELE = ("facebook/belebele tur_Latn, test", "hf://datasets/facebook/belebele/data/tur_Latn.jsonl",
            ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4",
             "correct_answer_num"))
TASKS: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("belebele_tr", "Belebele_TR", *BELEBELE, render_belebele, paper=(27.00, 55.78)),
    TaskDef("belebele_tr_cetvel", "Belebele_TR (CETVEL's prompt before 2024-12-10)", *BELEBELE, render_belebele_cetvel),
    TaskDef("exams_tr", "EXAMS_TR", "exams (mhardalov/exams) crosslingual_tr, validation",
            "hf://datasets/mhardalov/exams/crosslingual_tr/validation-00000-of-00001.parquet",
            ("question", "answerKey"), render_exams, paper=(27.74, 30.03)),
    TaskDef("ironytr", "IronyTR", "mcemilg/IronyTR, validation", "hf://datasets/mcemilg/IronyTR/val.csv",
            ("text", "label"), render_irony, IRONY_METRICS, paper=(52.00, 52.17)),
    TaskDef("news_cat", "News_Cat", "mcemilg/news-cat, test", "hf://datasets/mcemilg/news-cat/test.jsonl",
            ("text", "label"), render_news, F1, paper=(32.40, 81.20)),
    TaskDef("mnli_tr", "MNLI_TR", "nli_tr (boun-tabi/nli_tr) multinli_tr, validation_matched",
            "hf://datasets/boun-tabi/nli_tr/multinli_tr/validation_matched-00000-of-00001.parquet",
            ("premise", "hypothesis", "label"), render_mnli, paper=(32.81, 36.42)),
    TaskDef("sts_tr", "STS_TR", "emrecan/stsb-mt-turkish, test", "hf://datasets/emrecan/stsb-mt-turkish/test.csv",
            ("sentence1", "sentence2", "score"), render_sts, paper=(18.78, 18.78)),
    TaskDef("xcopa_tr", "XCOPA_TR", "xcopa (cambridgeltl/xcopa) tr, test",
            "hf://datasets/cambridgeltl/xcopa/tr/test-00000-of-00001.parquet",
            ("premise", "choice1", "choice2", "question", "label"), render_xcopa, paper=(52.00, 64.20)),
]}
GENERIC = TaskDef("mc", "mc", "user file", "", ("prompt", "choices", "label"), render_generic)
