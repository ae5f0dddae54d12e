"""What of an answer is final after a block: the text a stream may send without taking it back.

A committed token is never re-masked, but three rules can still change the text of the blocks
committed so far (answer_text: cut at eos or pad, then at "[/Answer]", stripped; StopRules: cut
at a stop string, from the token where it begins):
    a stop string          can only begin in what ends the text now as a prefix of it; the cut
                           would start at that token, so the text from that token on waits
    "[/Answer]", U+FFFD    a prefix of the end of turn, or a character whose bytes are not all
                           here yet, waits at the end of the text (and the spaces before it)
An answer that has ended (eos, pad, "[/Answer]") or finished is final as it is.
Reader's page: docs/serving.md ("Streaming").
"""
from __future__ import annotations

from minidiff.data.chat import END_OF_TURN
from minidiff.plumbing.sampling_cli import answer_ids, answer_text

PARTIAL_CHARACTER = "\ufffd"  # what decoding shows for a character whose bytes are not all here


def open_prefix(text: str, strings) -> int:
    """Where the longest suffix of `text` that is a proper prefix of one of `strings` begins
    (len(text) when there is none)."""
    starts = [len(text) - k for s in strings for k in range(1, len(s)) if text.endswith(s[:k])]
    return min(starts, default=len(text))


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


def settled_text(tok, ids: list[int], stop_strings, finished: bool) -> str:
    """The answer text that no later block can change; ids: the committed blocks of the answer."""
    if finished:
        return answer_text(tok, ids)
    ids = ids[: stable_tokens(tok, ids, stop_strings)]
    text = answer_text(tok, ids)
    if ended(tok, ids):
        return text
    text = text.rstrip(PARTIAL_CHARACTER)
    return text[: open_prefix(text, [END_OF_TURN])].rstrip()
