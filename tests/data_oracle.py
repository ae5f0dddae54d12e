"""The data rules written as plain Python lists: the oracle the index views of
minidiff.data.examples are checked against (tests/test_shards.py), itself checked against values
written by hand (tests/test_data.py).

    ids = tokenize_documents(read_documents("wiki.txt").texts, tok)
    cpt = cpt_examples(ids, 512, mode="drop", eos_id=tok.eos_id, bos_id=tok.bos_id)
    mixed = mix_sources([cpt, other], ratios=[0.7, 0.3], seed=0)
    train, held = train_eval_split(mixed, 0.1, seed=0)
    sft, report = build_sft_examples(read_rows("sft.jsonl"), "alpaca", tok, 256)

Conventions (dllm; docs/training.md, "Data"):
- CPT "drop" frames each document as `<bos> doc <eos>` (mmBERT's post-processor) and keeps it
  only when it fits in max_len; "pack" writes `doc <eos> doc <eos> ...` and cuts full blocks.
- SFT: prompt = chat template up to and including the generation prompt "[Answer]\\n" (labels
  IGNORE); answer = the last assistant turn's content + "\\n[/Answer]\\n\\n". No special tokens;
  the prompt is tokenised alone, as a sampler sees it.
"""
from __future__ import annotations

import random
from typing import Sequence

from minidiff.data.chat import SFT_FORMATS, render_sft
from minidiff.data.examples import IGNORE, SFTReport, mix_counts
from minidiff.errors import UserError


def cpt_examples(token_lists: Sequence[Sequence[int]], max_len: int, mode: str = "drop", *,
                 eos_id: int, bos_id: int | None = None) -> list[list[int]]:
    """CPT training sequences from tokenised documents.

    "drop" (the paper): each document framed `<bos> doc <eos>` (bos only when bos_id is given),
    kept only when the framed length is <= max_len; longer ones are left out.
    "pack" (dllm's tokenize_and_group with insert_eos): documents written one after another as
    `doc <eos> doc <eos> ...` and cut into full max_len blocks; the last partial block is
    dropped. No bos: a block can start mid-document."""
    if max_len < 2:
        raise UserError(f"max_len={max_len} is too small; expected at least 2 tokens")
    if mode == "drop":
        head = [] if bos_id is None else [bos_id]
        framed = (head + list(ids) + [eos_id] for ids in token_lists if len(ids) > 0)
        return [seq for seq in framed if len(seq) <= max_len]
    if mode == "pack":
        stream = [t for ids in token_lists if len(ids) > 0 for t in (*ids, eos_id)]
        return [stream[i:i + max_len] for i in range(0, len(stream) - max_len + 1, max_len)]
    raise UserError(f"CPT mode {mode!r} is unknown; expected 'drop' or 'pack'")


def mix_sources(lists: Sequence[Sequence], counts: Sequence[int] | None = None,
                ratios: Sequence[float] | None = None, seed: int = 0) -> list:
    """Mix several example lists into one shuffled list.

    counts: take counts[i] items of list i (a random subset when fewer than it holds; the whole
    list repeated, then a random subset for the remainder, when more). ratios: the largest
    mixture with these proportions that needs no repetition, i.e. total N = min_i len_i / r_i
    and floor(N * r_i) items of list i. Neither: everything. Shuffled with `seed`."""
    counts = mix_counts([len(items) for items in lists], counts, ratios)
    rng = random.Random(seed)
    mixed = []
    for items, count in zip(lists, counts):
        repeats, remainder = divmod(count, len(items)) if items else (0, 0)
        mixed.extend(list(items) * repeats)
        mixed.extend(items[i] for i in sorted(rng.sample(range(len(items)), remainder)))
    rng.shuffle(mixed)
    return mixed


def train_eval_split(items: Sequence, eval_size: int | float, seed: int = 0) -> tuple[list, list]:
    """Split off a held-out set: `eval_size` items (int) or that fraction (float < 1), chosen
    with `seed`; the rest keep their order."""
    n = len(items)
    k = int(round(eval_size * n)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 <= k < n:
        raise UserError(f"eval size {eval_size} leaves no training data out of {n} examples")
    held = set(random.Random(seed).sample(range(n), k))
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def sft_example(row: dict, fmt: str, tokenizer, max_len: int, where: str = "row"
                ) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels): prompt ids then answer ids, labels IGNORE on the prompt and equal to
    the ids on the answer. None when the prompt leaves no room for an answer token
    (len(prompt) >= max_len); otherwise right-truncated to max_len."""
    prompt_ids, answer_ids = _encode_sft(row, fmt, tokenizer, where)
    return _join_sft(prompt_ids, answer_ids, max_len)


def _encode_sft(row, fmt, tokenizer, where):
    """(prompt_ids, answer_ids). The prompt is tokenised alone, exactly as a sampler will see it;
    the answer is the tail of the whole text's tokenisation when that starts with the prompt's
    ids (the usual case), else tokenised alone (a BPE merge crossed the boundary)."""
    prompt, answer = render_sft(row, fmt, tokenizer, where)
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    full_ids = list(tokenizer.encode(prompt + answer, add_special_tokens=False))
    if full_ids[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):]
    return prompt_ids, list(tokenizer.encode(answer, add_special_tokens=False))


def _join_sft(prompt_ids, answer_ids, max_len):
    if len(prompt_ids) >= max_len:
        return None
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return ids, labels


def build_sft_examples(rows: Sequence[dict], fmt: str, tokenizer, max_len: int
                       ) -> tuple[list[tuple[list[int], list[int]]], SFTReport]:
    """sft_example over all rows. UserError naming the row and field for a malformed row, a
    wrong format name, or when every row is dropped."""
    if fmt not in SFT_FORMATS:
        raise UserError(f"SFT format {fmt!r} is unknown; expected one of {', '.join(SFT_FORMATS)}")
    where = getattr(rows, "where", None) or [f"row {i + 1}" for i in range(len(rows))]
    report, examples = SFTReport(rows=len(rows), max_len=max_len), []
    for row, place in zip(rows, where):
        if not isinstance(row, dict):
            raise UserError(f"{place}: an SFT row must be an object, got {type(row).__name__}")
        prompt_ids, answer_ids = _encode_sft(row, fmt, tokenizer, place)
        example = _join_sft(prompt_ids, answer_ids, max_len)
        if example is None:
            report.dropped_prompt_too_long += 1
            continue
        examples.append(example)
        report.truncated += int(len(prompt_ids) + len(answer_ids) > max_len)
    report.kept = len(examples)
    if not examples:
        raise UserError(f"all {len(rows):,} SFT rows were dropped: every prompt is >= max_len={max_len} tokens")
    return examples, report
