"""Training examples as index arrays over token shards (CPT drop and pack, SFT rows, mixing, the
held-out split), gathered from the memory map only when a batch asks (docs/training.md, "Examples as index views").
References: the Diffutron paper (arXiv 2603.20466) for the drop rule, dllm's tokenize_and_group
(insert_eos) for packing and its SFT collator for the labels.

    views = [PackExamples(shard, 512, eos_id=1) for shard in shards]
    train = mix(views, ratios=[0.7, 0.3], seed=0)          # a Take over a Concat; train[i]: int64 ids [L]
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from minidiff.errors import UserError

IGNORE = -100  # label of positions that carry no loss and are never masked (the SFT prompt)


class Examples:
    """A read-only sequence of examples (len, [i], iteration); subclasses define __len__ and _get."""

    def __getitem__(self, i):
        i, n = int(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        return self._get(i % n)

    def __iter__(self):
        return (self._get(i) for i in range(len(self)))


def _doc(shard, d: int) -> np.ndarray:
    return np.asarray(shard.tokens[shard.offsets[d]:shard.offsets[d + 1]], dtype=np.int64)  # [len_d]


def _check_max_len(max_len: int) -> None:
    if max_len < 2:
        raise UserError(f"max_len={max_len} is too small; expected at least 2 tokens")


class DropExamples(Examples):
    """`<bos> doc <eos>` (no bos when bos_id is None) of every non-empty document that fits in max_len."""

    def __init__(self, shard, max_len: int, *, eos_id: int, bos_id: int | None = None):
        _check_max_len(max_len)
        self.shard, self.eos_id, self.bos_id = shard, eos_id, bos_id
        self.head = np.asarray([] if bos_id is None else [bos_id], dtype=np.int64)
        lengths = shard.lengths  # [D]
        # framed length = len + 1 (eos) + 1 (bos, when given)
        framed = lengths + 1 + len(self.head)
        self.documents = np.flatnonzero((lengths > 0) & (framed <= max_len))  # [N]
        self.left_out = int(((lengths > 0) & (framed > max_len)).sum())

    def __len__(self) -> int:
        return len(self.documents)

    def _get(self, i: int) -> np.ndarray:
        return np.concatenate([self.head, _doc(self.shard, self.documents[i]), [self.eos_id]])


class PackExamples(Examples):
    """Block b = positions [b * max_len, (b + 1) * max_len) of the stream `doc <eos> doc <eos> ...`; full blocks."""

    def __init__(self, shard, max_len: int, *, eos_id: int):
        _check_max_len(max_len)
        self.shard, self.max_len, self.eos_id = shard, max_len, eos_id
        kept = np.flatnonzero(shard.lengths > 0)  # [K] documents in the stream
        self.lengths = shard.lengths[kept]  # [K]
        self.token_start = np.asarray(shard.offsets[kept], dtype=np.int64)  # [K] where doc k starts in tokens.bin
        # stream_start[k] = sum_{j<k} (len_j + 1): each document is followed by one eos
        self.stream_start = np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]]).astype(np.int64)  # [K]
        self.blocks = int((self.lengths + 1).sum()) // max_len

    def __len__(self) -> int:
        return self.blocks

    def _get(self, b: int) -> np.ndarray:
        positions = np.arange(b * self.max_len, (b + 1) * self.max_len, dtype=np.int64)  # [L] stream positions
        k = np.searchsorted(self.stream_start, positions, side="right") - 1  # [L] document of each position
        within = positions - self.stream_start[k]  # [L] 0..len_k, len_k being the eos after it
        is_eos = within == self.lengths[k]
        gather = self.token_start[k] + np.minimum(within, self.lengths[k] - 1)  # [L] (eos positions: any valid)
        ids = np.asarray(self.shard.tokens[gather], dtype=np.int64)
        ids[is_eos] = self.eos_id
        return ids


@dataclass
class SFTReport:
    rows: int = 0
    kept: int = 0
    dropped_prompt_too_long: int = 0
    cut_prompt_too_long: int = 0
    truncated: int = 0
    max_len: int = 0

    def summary(self) -> str:
        return (f"{self.kept:,} of {self.rows:,} SFT rows kept; {self.dropped_prompt_too_long:,} dropped "
                f"(prompt alone >= {self.max_len} tokens); {self.cut_prompt_too_long:,} prompts cut from the "
                f"left to {self.max_len // 2} tokens; {self.truncated:,} answers right-truncated")


LONG_PROMPTS = ("drop", "cut")  # what happens to a row whose prompt alone fills max_len


class SFTExamples(Examples):
    """(input_ids, labels) of every row, right-truncated to max_len, labels IGNORE on the prompt; a prompt of
    max_len or more: long_prompts="drop" leaves the row out, "cut" keeps its last max_len // 2 tokens."""

    def __init__(self, shard, max_len: int, long_prompts: str = "drop"):
        if long_prompts not in LONG_PROMPTS:
            raise UserError(f"long_prompts={long_prompts!r}; expected one of {', '.join(LONG_PROMPTS)}")
        self.shard, self.max_len = shard, max_len
        prompt = np.asarray(shard.prompt_lengths, dtype=np.int64)  # [D]
        too_long = prompt >= max_len  # [D]
        # where a row starts in its document: the cut prompt's first kept token
        self.starts = np.where(too_long, prompt - max_len // 2, 0) if long_prompts == "cut" else np.zeros_like(prompt)
        self.rows = np.flatnonzero(~too_long) if long_prompts == "drop" else np.arange(len(prompt))  # [N]
        cut = int(too_long.sum()) if long_prompts == "cut" else 0
        self.report = SFTReport(rows=len(prompt), kept=len(self.rows), max_len=max_len,
                                dropped_prompt_too_long=int(too_long.sum()) - cut, cut_prompt_too_long=cut,
                                truncated=int((shard.lengths[self.rows] - self.starts[self.rows] > max_len).sum()))

    def __len__(self) -> int:
        return len(self.rows)

    def _get(self, i: int):
        row = self.rows[i]
        start = self.starts[row]
        ids = _doc(self.shard, row)[start:start + self.max_len]  # [L <= max_len]
        labels = ids.copy()
        labels[:self.shard.prompt_lengths[row] - start] = IGNORE
        return ids, labels


def sft_report(views: Sequence[SFTExamples]) -> SFTReport:
    report = SFTReport(max_len=views[0].max_len)
    for view in views:
        for name in ("rows", "kept", "dropped_prompt_too_long", "cut_prompt_too_long", "truncated"):
            setattr(report, name, getattr(report, name) + getattr(view.report, name))
    if not report.kept:
        raise UserError(f"all {report.rows:,} SFT rows were dropped: "
                        f"every prompt is >= max_len={report.max_len} tokens")
    return report


class Concat(Examples):
    def __init__(self, parts: Sequence[Examples]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # [P + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _get(self, i: int):
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


class Take(Examples):
    """base[indices[0]], base[indices[1]], ...; a Take of a Take composes the indices."""

    def __init__(self, base: Examples, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(base, Take):
            base, indices = base.base, base.indices[indices]
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, i: int):
        return self.base[self.indices[i]]


def mix_counts(sizes: Sequence[int], counts: Sequence[int] | None = None,
               ratios: Sequence[float] | None = None) -> list[int]:
    """Examples taken of each source: `counts`; for `ratios`, the largest mixture needing no repetition; else all."""
    if counts is not None and ratios is not None:
        raise UserError("give either counts or ratios for mixing sources, not both")
    if counts is None and ratios is not None:
        if len(ratios) != len(sizes) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise UserError(f"mixing ratios {list(ratios)} must be {len(sizes)} non-negative numbers, not all zero")
        shares = [r / sum(ratios) for r in ratios]
        # N = min_i len_i / r_i, count_i = floor(N * r_i)
        total = min(size / share for size, share in zip(sizes, shares) if share > 0)
        counts = [math.floor(total * share + 1e-9) for share in shares]
    if counts is None:
        counts = list(sizes)
    if len(counts) != len(sizes) or any(c < 0 for c in counts):
        raise UserError(f"mixing counts {list(counts)} must be {len(sizes)} non-negative integers")
    for size, count in zip(sizes, counts):
        if count and not size:
            raise UserError(f"a source asked for {count} examples is empty")
    return list(counts)


def mix(views: Sequence[Examples], counts=None, ratios=None, seed: int = 0) -> Take:
    """A Take of the views' Concat: view i whole count_i // size_i times plus a sample of the rest, shuffled."""
    sizes = [len(v) for v in views]
    counts = mix_counts(sizes, counts, ratios)
    rng = random.Random(seed)
    parts, start = [], 0
    for size, count in zip(sizes, counts):
        repeats, remainder = divmod(count, size) if size else (0, 0)
        parts.append(np.tile(np.arange(start, start + size, dtype=np.int64), repeats))
        parts.append(start + np.asarray(sorted(rng.sample(range(size), remainder)), dtype=np.int64))
        start += size
    mixed = np.concatenate(parts)  # [sum(counts)]
    rng.shuffle(mixed)
    return Take(Concat(views), mixed)


def split(view: Examples, eval_size: int | float, seed: int = 0) -> tuple[Take, Take]:
    """(the rest, the held-out ones), both in order: `eval_size` examples (or that fraction, a float < 1)."""
    n = len(view)
    k = int(round(eval_size * n)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 <= k < n:
        raise UserError(f"eval size {eval_size} leaves no training data out of {n} examples")
    held = np.asarray(sorted(random.Random(seed).sample(range(n), k)), dtype=np.int64)
    return Take(view, np.setdiff1d(np.arange(n), held)), Take(view, held)
