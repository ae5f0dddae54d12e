"""Filling in masked characters of held-out text: what the NELBO bound measures, against two baselines.

References: LLaDA (arXiv 2502.09992, the unmasking); the study: docs/sampler.md ("Infilling, as the
demo scores it"). `fill` is the fast loop's `minidiff.speed.sampling.infill` (whose trace the replay
needs) or any function with its signature.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidiff.plumbing.trace_page import write_trace_html
from minidiff.sampler import SamplerConfig

MASKINGS = (  # (name, kind, rate): the rows of the infilling table
    ("random characters, 15%", "characters", 0.15),
    ("random characters, 30%", "characters", 0.30),
    ("whole words, 20% of the words", "words", 0.20),
)
EXAMPLE_MASKING = 1  # the row of MASKINGS whose masks the step-by-step example shows
MASK_SHOWN = "▒"  # a masked character on the page
NOT_A_CHARACTER = "\ufffd"  # what a fill that is no single character (a byte, a special) reads as
MIN_SNIPPET = 24  # characters; shorter pieces (a speech's last words) are left out


@dataclass
class Snippet:
    text: str  # held-out text, whitespace collapsed, at most max_len - 1 characters
    ids: list[int]  # its tokens: the tokenizer's leading "▁" (if any), then one per character
    offset: int  # len(ids) - len(text): the token position of character 0


def cut_snippets(texts: list[str], max_chars: int) -> list[str]:
    """Each text's words packed greedily into pieces of at most max_chars characters (longer words dropped)."""
    pieces = []
    for text in texts:
        current = ""
        for word in text.split():
            joined = f"{current} {word}" if current else word
            if len(joined) <= max_chars:
                current = joined
                continue
            if len(current) >= MIN_SNIPPET:
                pieces.append(current)
            current = word if len(word) <= max_chars else ""
        if len(current) >= MIN_SNIPPET:
            pieces.append(current)
    return pieces


def character_ids(tok) -> dict[str, int]:
    """character -> id for every one-character token of the demo's tokenizer (space is "▁")."""
    vocab = tok.backend.get_vocab()
    return {(" " if piece == "▁" else piece): i for piece, i in vocab.items() if len(piece) == 1}


def as_snippet(tok, text: str, char_ids: dict[str, int]) -> Snippet | None:
    """The snippet if one character is exactly one token (after an optional leading "▁"), else None."""
    ids = tok.encode(text, add_special_tokens=False)
    offset = len(ids) - len(text)
    if offset not in (0, 1) or ids[offset:] != [char_ids.get(c) for c in text]:
        return None
    return Snippet(text, ids, offset)


def mask_characters(text: str, rate: float, rng: random.Random) -> list[int]:
    """round(rate * len(text)) character positions (at least one), uniformly without replacement."""
    return sorted(rng.sample(range(len(text)), max(1, round(rate * len(text)))))


def mask_words(text: str, rate: float, rng: random.Random) -> list[int]:
    """Every character of round(rate * words) words (at least one), drawn uniformly; spaces and punctuation stay."""
    words = [m.span() for m in re.finditer(r"\w+", text)]
    if not words:
        return []
    chosen = rng.sample(words, max(1, round(rate * len(words))))
    return sorted(i for start, end in chosen for i in range(start, end))


def most_frequent_character(texts: list[str]) -> str:
    return Counter(c for text in texts for c in text).most_common(1)[0][0]


class CharBigram:
    """Character bigrams with add-one smoothing over `alphabet` + the texts' characters; each position of a
    masked run x_1..x_m between known a and b gets argmax p(x_k | a, b), by forward-backward, where
        p(x_k | a, b) ∝ sum over the other x of P(x_1 | a) prod_k P(x_k | x_k-1) P(b | x_m)   (no a: P(x_1); no b: 1)"""

    def __init__(self, texts: list[str], alphabet=()):
        self.chars = sorted(set(alphabet).union(*map(set, texts)))
        self.index = {c: i for i, c in enumerate(self.chars)}
        A = len(self.chars)
        pairs, singles = np.zeros((A, A)), np.zeros(A)
        for text in texts:
            ids = np.array([self.index[c] for c in text], dtype=np.int64)
            np.add.at(pairs, (ids[:-1], ids[1:]), 1)
            np.add.at(singles, ids, 1)
        # P(c | a) = (n(a c) + 1) / (n(a .) + A)
        self.transition = (pairs + 1) / (pairs.sum(1, keepdims=True) + A)  # [A, A] rows: a
        # P(c) = (n(c) + 1) / (N + A)
        self.unigram = (singles + 1) / (singles.sum() + A)  # [A]

    def fill(self, text: str, masked: list[int]) -> str:
        out = list(text)
        for start, end in _runs(masked):  # the neighbours of a maximal run are never masked
            left = self.index[text[start - 1]] if start > 0 else None
            right = self.index[text[end]] if end < len(text) else None
            for k, c in enumerate(self.posterior(end - start, left, right).argmax(1)):
                out[start + k] = self.chars[c]
        return "".join(out)

    def posterior(self, m: int, left: int | None, right: int | None) -> np.ndarray:
        """[m, A]: p(x_k = c | a, b) for a run of m masked characters."""
        P = self.transition
        forward = [P[left] if left is not None else self.unigram]  # alpha_1(c) = P(c | a)
        for _ in range(m - 1):  # alpha_k(c) = sum_c' alpha_k-1(c') P(c | c')
            step = forward[-1] @ P
            forward.append(step / step.sum())
        backward = [P[:, right] if right is not None else np.ones(len(self.chars))]  # beta_m(c) = P(b | c)
        for _ in range(m - 1):  # beta_k(c) = sum_c'' P(c'' | c) beta_k+1(c'')
            step = P @ backward[-1]
            backward.append(step / step.sum())
        joint = np.stack(forward) * np.stack(backward[::-1])  # [m, A]
        return joint / joint.sum(1, keepdims=True)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> maximal runs [start, end) of consecutive ones."""
    runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]


def masked_accuracy(truths: list[str], guesses: list[str], masks: list[list[int]]) -> float:
    correct = sum(t[i] == g[i] for t, g, m in zip(truths, guesses, masks) for i in m)
    return correct / max(1, sum(len(m) for m in masks))


def fill_by_model(model, tok, snippets: list[Snippet], masks: list[list[int]], id_chars, fill, *, one_step: bool):
    """(the snippets filled by `fill`, greedy, one character per step or all at once, as text; the output)."""
    rows = [list(snippet.ids) for snippet in snippets]
    for row, snippet, masked in zip(rows, snippets, masks):
        for i in masked:
            row[snippet.offset + i] = tok.mask_id
    steps = 1 if one_step else max(1, max(len(m) for m in masks))
    config = SamplerConfig(steps=steps, block_length=max(len(r) for r in rows), unmasking="llada", temperature=0.0)
    out = fill(model, rows, config, mask_id=tok.mask_id, eos_id=tok.eos_id)
    canvases = [row[s.offset: s.offset + len(s.text)] for row, s in zip(out.sequences.tolist(), snippets)]
    return ["".join(id_chars.get(t, NOT_A_CHARACTER) for t in ids) for ids in canvases], out


def held_out_snippets(tok, texts: list[str], max_chars: int, count: int, seed: int) -> tuple[list[Snippet], int]:
    """(up to `count` snippets drawn with the seed, the pieces left out because a character was not one token)."""
    char_ids = character_ids(tok)
    snippets = [as_snippet(tok, text, char_ids) for text in cut_snippets(texts, max_chars)]
    kept = [s for s in snippets if s is not None]
    chosen = sorted(random.Random(seed).sample(range(len(kept)), min(count, len(kept))))
    return [kept[i] for i in chosen], len(snippets) - len(kept)


def infill_table(model, tok, snippets: list[Snippet], train_texts: list[str], seed: int, fill) -> dict:
    """Character accuracy on the masked positions per masking: the model against both baselines."""
    id_chars = {i: c for c, i in character_ids(tok).items()}
    truths = [s.text for s in snippets]
    bigram = CharBigram(train_texts, alphabet="".join(truths))
    frequent = most_frequent_character(train_texts)
    rows, drawn = [], []
    for n, (name, kind, rate) in enumerate(MASKINGS):
        rng = random.Random(seed * 1000 + n)
        draw = mask_characters if kind == "characters" else mask_words
        masks = [draw(text, rate, rng) for text in truths]
        stepwise, _ = fill_by_model(model, tok, snippets, masks, id_chars, fill, one_step=False)
        at_once, _ = fill_by_model(model, tok, snippets, masks, id_chars, fill, one_step=True)
        guesses = {"most_frequent": [frequent * len(t) for t in truths],
                   "bigram": [bigram.fill(t, m) for t, m in zip(truths, masks)], "model_one_step": at_once,
                   "model": stepwise}
        rows.append({"masking": name, "masked_chars": sum(map(len, masks)),
                     **{k: masked_accuracy(truths, g, masks) for k, g in guesses.items()}})
        drawn.append(masks)
    return {"rows": rows, "snippets": len(snippets), "chars": sum(map(len, truths)),
            "most_frequent_char": frequent, "masks": drawn}


def denoising_example(model, tok, snippet: Snippet, masked: list[int], html_path: Path, fill) -> dict:
    """One snippet's canvas after every step (masks as MASK_SHOWN), also written as the HTML replay."""
    id_chars = {i: c for c, i in character_ids(tok).items()}
    filled, out = fill_by_model(model, tok, [snippet], [masked], id_chars, fill, one_step=False)
    frames = []
    for canvas in out.frames():  # the canvas after each step, frame 0 = before the first
        ids = canvas[0][snippet.offset: snippet.offset + len(snippet.text)]
        frames.append("".join(MASK_SHOWN if t == tok.mask_id else id_chars.get(t, NOT_A_CHARACTER) for t in ids))
    write_trace_html(html_path, tok, out, [snippet.text[: masked[0]]])
    return {"text": snippet.text, "masked": masked, "frames": frames, "filled": filled[0],
            "correct": sum(snippet.text[i] == filled[0][i] for i in masked)}


def infill_study(model, tok, snippets: list[Snippet], train_speeches: list[str], seed: int, html_path: Path,
                 fill) -> dict:
    """The infilling table and the step-by-step example: the first snippet, masked as in row EXAMPLE_MASKING."""
    train_texts = [" ".join(s.split()) for s in train_speeches]
    table = infill_table(model, tok, snippets, train_texts, seed, fill)
    example = denoising_example(model, tok, snippets[0], table.pop("masks")[EXAMPLE_MASKING][0], html_path, fill)
    return {**table, "example": example}
