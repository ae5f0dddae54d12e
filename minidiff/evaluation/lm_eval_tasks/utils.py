"""Functions the CETVEL task files call with `!function utils.NAME` (lm-evaluation-harness).

Self-contained, so this folder is a plain lm-eval include path; the tests check it agrees with tasks.py.
"""
import math

NEWS_LABELS = ["sport", "magazine", "politics", "health", "economy"]
NEWS_CHOICES = ["spor", "magazin", "siyaset", "sağlık", "ekonomi"]
XCOPA_CONNECTORS = {"cause": "çünkü", "effect": "bu yüzden"}


def news_label(doc) -> int:
    """An English label name (CETVEL's mapping), a Turkish choice, or an index 0..4."""
    label = doc["label"]
    if isinstance(label, str):
        name = label.strip().casefold()
        if name in NEWS_LABELS:
            return NEWS_LABELS.index(name)
        if name in NEWS_CHOICES:
            return NEWS_CHOICES.index(name)
    return int(label)


def macro_f1(items) -> float:
    """sklearn's macro F1 of lm-eval's (gold, pred) pairs."""
    from sklearn.metrics import f1_score

    gold, pred = zip(*items)
    return float(f1_score(gold, pred, average="macro"))


def sts_label(doc) -> int:
    """The 0-5 similarity score rounded half up to a bin 0..5."""
    return min(5, max(0, math.floor(float(doc["score"]) + 0.5)))


def xcopa_text(doc) -> str:
    premise = doc["premise"].strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    return f"{premise} {XCOPA_CONNECTORS[doc['question']]}"


def xcopa_choices(doc) -> list:
    return [c[:1].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
