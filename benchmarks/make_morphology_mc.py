"""A Turkish vowel-harmony multiple-choice task from held-out text: pick a word's right suffix.

References: none (a fixture of this project, docs/evaluation.md "How many samples"). The choices
are the word with each variant of its suffix (FAMILIES), the prompt the text before it; rows are
evaluate.py's multiple-choice format, {"prompt", "choices", "label"}:

    python benchmarks/make_morphology_mc.py runs/demo/data/speeches_heldout.jsonl \\
        benchmarks/data/morphology_tr.jsonl
    python evaluate.py --model runs/demo/cpt --task mc:benchmarks/data/morphology_tr.jsonl --out r.json
"""
from __future__ import annotations

import argparse
import json
import random
import re

from minidiff.errors import UserError, run_cli
from minidiff.plumbing.files import write_text

# each family: the variants of one suffix; the longest suffixes are tried first
FAMILIES = [("ler", "lar"), ("de", "da", "te", "ta"), ("den", "dan", "ten", "tan"),
            ("nin", "nın", "nun", "nün"), ("dir", "dır", "dur", "dür"), ("tir", "tır", "tur", "tür"),
            ("di", "dı", "du", "dü"), ("ti", "tı", "tu", "tü"), ("mek", "mak"),
            ("miş", "mış", "muş", "müş")]
SUFFIXES = sorted(((s, f) for f in FAMILIES for s in f), key=lambda pair: -len(pair[0]))
WORD = re.compile(r"\w+")


def items_of(text: str, context: int, max_word: int):
    """(prompt, word, family) for every word of `text` ending in a suffix of FAMILIES."""
    for match in WORD.finditer(text):
        word = match.group()
        if not 3 <= len(word) <= max_word or not word.islower():
            continue
        suffix, family = next(((s, f) for s, f in SUFFIXES if word.endswith(s)), (None, None))
        if suffix is None or len(word) - len(suffix) < 2:
            continue
        before = text[max(0, match.start() - context):match.start()]
        before = before[before.find(" ") + 1:] if match.start() > context else before
        if len(before.strip()) >= 10:
            yield before.strip(), word, [word[:-len(suffix)] + s for s in family]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="JSONL of {'text': ...} documents (the demo's held-out speeches)")
    p.add_argument("out", help="JSONL to write")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--context", type=int, default=48, help="characters of text before the word")
    p.add_argument("--max-word", type=int, default=6, help="longest word, in characters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        with open(args.source, encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{args.source}: expected a readable JSONL file of {{'text': ...}} rows") from None
    candidates = [item for text in texts for item in items_of(text, args.context, args.max_word)]
    if len(candidates) < args.items:
        raise UserError(f"{args.source} yields {len(candidates)} items; asked for {args.items}")
    rng = random.Random(args.seed)
    rows = []
    for prompt, word, choices in rng.sample(candidates, args.items):
        rng.shuffle(choices)
        rows.append({"prompt": prompt, "choices": choices, "label": choices.index(word)})
    write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    run_cli(main)
