"""What of an answer is final after a block: the text a stream may send without taking it back.

A committed token is never re-masked, but a later block can still change the text so far: a run
of byte tokens <0xNN> that ends it, a proper prefix of a stop string or of "[/Answer]" that ends it
(the stop cut starts at the token where the string begins). Those wait; an answer that has ended
(eos, pad, "[/Answer]") or finished is final as it is. Reader's page: docs/serving.md ("Streaming").
"""
from __future__ import annotations

import re

from minidiff.data.chat import END_OF_TURN
from minidiff.plumbing.sampling_cli import answer_ids, answer_text

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte fallback's tokens (SentencePiece, Gemma, mmBERT)


def open_prefix(text: str, strings) -> int:
    """Where the longest suffix of `text` that is a proper prefix of one of `strings` begins
    (len(text) when there is none)."""
    starts = [len(text) - k for s in strings for k in range(1, len(s)) if text.endswith(s[:k])]
    return min(starts, default=len(text))


def sealed_tokens(tok, ids: list[int]) -> int:
    """How many of `ids` precede the run of byte tokens that ends them (all, without one)."""
    n = len(ids)
    while n and BYTE_TOKEN.fullmatch(tok.backend.id_to_token(ids[n - 1]) or ""):
        n -= 1
    return n


def stable_tokens(tok, ids: list[int], stop_strings) -> int:
    """How many of `ids` no later stop-string cut can reach (the cut begins at the token where the
    stop string begins: the first prefix of ids whose text reaches past that character)."""
    text = tok.decode(ids, skip_special_tokens=False)
    start = open_prefix(text, stop_strings)
    if start == len(text):
        return len(ids)
    for n in range(len(ids) + 1):
        if len(tok.decode(ids[:n], skip_special_tokens=False)) > start:
            return max(n - 1, 0)
    return len(ids)


def ended(tok, ids: list[int]) -> bool:
    """Has the answer ended: eos, pad or the end of turn in its text?"""
    kept = answer_ids(tok, ids)
    return len(kept) < len(ids) or END_OF_TURN in tok.decode(kept, skip_special_tokens=True)


def settled_text(tok, answer: list[int], stop_strings, finished: bool) -> str:
    """The text of `answer` (its committed blocks, then <mask>) that no later block can change."""
    if finished:
        return answer_text(tok, answer)
    ids = answer[: answer.index(tok.mask_id)] if tok.mask_id in answer else answer
    ids = ids[: sealed_tokens(tok, ids)]
    ids = ids[: stable_tokens(tok, ids, stop_strings)]
    text = answer_text(tok, ids)
    if ended(tok, ids):
        return text
    return text[: open_prefix(text, [END_OF_TURN])].rstrip()
