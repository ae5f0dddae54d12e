"""serving.settled: a stream sends only text that no later block changes, against the stop rules
themselves (data/chat.py StopRules) run block by block on answers built to hit every case."""
from __future__ import annotations

import random

import pytest
from helpers import TURKISH_TEXT, make_tokenizer_dir

import minidiff
from minidiff.data.chat import StopRules
from minidiff.plumbing.sampling_cli import answer_text
from minidiff.sampler import SamplerConfig, build_canvas
from minidiff.speed.sampling import FastConfig
from minidiff.serving.settled import open_prefix, settled_text

BLOCK = 4


MARKERS = ["[/Answer]", "</s>", "<|USER|>", "ti"]  # the end of turn and stop strings the test uses


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = TURKISH_TEXT * 4 + [" ".join(MARKERS)] * 4  # the markers' pieces are subwords, not bytes
    return minidiff.load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok"), texts=texts))


def blocks_of(tok, answer: list[int], config: SamplerConfig):
    """What a run commits block by block: (the answer after each block's stop rules, finished)."""
    prompt = [tok.bos_id]
    rows = [prompt + [tok.mask_id] * len(answer)]
    canvas = build_canvas(rows, [len(prompt)], len(answer), [len(prompt)], config, mask_id=tok.mask_id,
                          eos_id=tok.eos_id, device="cpu")
    stops, ids = StopRules.make(config, tok, tok.pad_id, tok.eos_id), canvas.ids.clone()
    for b, block in enumerate(canvas.blocks):
        at = block[0].tolist()
        ids[0, at] = ids.new_tensor([answer[p - len(prompt)] for p in at])
        last = b + 1 == len(canvas.blocks)
        stopped = stops.end_of_block(ids, canvas, block, last)
        done = stopped or last or tok.mask_id not in ids[0, len(prompt):].tolist()
        yield ids[0, len(prompt):].tolist(), done
        if done:
            return


def glued(tok, text: str) -> list[int]:
    """Ids that decode to `text` after any other text: its longest subwords (not the word-start
    "▁" ones), a character's UTF-8 bytes (byte-fallback tokens) where the vocabulary has none."""
    ids, i = [], 0
    while i < len(text):
        j = next((j for j in range(len(text), i, -1) if tok.backend.token_to_id(text[i:j]) is not None), i)
        if j > i:
            ids.append(tok.backend.token_to_id(text[i:j]))
        else:
            ids += [tok.backend.token_to_id(f"<0x{b:02X}>") for b in text[i].encode()]
        i = max(j, i + 1)
    assert tok.decode([tok.encode("x", add_special_tokens=False)[-1]] + ids) == "x" + text, text
    return ids


def test_open_prefix():
    assert open_prefix("abc [/Ans", ["[/Answer]"]) == 4
    assert open_prefix("abc", ["[/Answer]"]) == 3
    assert open_prefix("x</", ["<s>", "</s>"]) == 1
    assert open_prefix("x<", ["<s>", "</s>"]) == 1


@pytest.mark.parametrize("stop_strings", [(), ("</s>", "<|USER|>"), ("ç", "ti")])
def test_streamed_text_is_never_taken_back(tok, stop_strings):
    """Answers of pieces that straddle block ends (stop strings, "[/Answer]", the bytes of one
    character): after every block the settled text is a prefix of the final answer, and at the
    end it is the final answer, as a stream that sends text[len(sent):] needs."""
    pieces = ["a", " b", "ç", " ", "\n", "t", "i", "[/", "Ans", "</", "<|US", "|>", *MARKERS]
    pool = [glued(tok, p) for p in pieces]
    first_byte = tok.backend.token_to_id("<0xC4>")  # "ğ" is <0xC4><0x9F>; alone, U+FFFD
    assert tok.decode([first_byte, tok.backend.token_to_id("<0x9F>")]) == "ğ"
    byte_a = tok.backend.token_to_id("<0x61>")  # "a" as a byte: [<0x61>, <0xC4>] decodes to U+FFFD twice
    pool += [[tok.eos_id], [first_byte], [first_byte] + glued(tok, "a"), glued(tok, "ğ"), [byte_a]]
    config = FastConfig(max_new_tokens=24, steps=24, block_length=BLOCK, stop_strings=stop_strings)
    generator, streamed, early = random.Random(0), 0, 0
    for _ in range(150):
        answer = [t for _ in range(24) for t in generator.choice(pool)][:24]
        commits = list(blocks_of(tok, answer, config))
        final = answer_text(tok, commits[-1][0])
        sent = ""
        for ids, finished in commits:
            text = settled_text(tok, ids, stop_strings, finished)
            assert text.startswith(sent) and final.startswith(text), (answer, ids)
            sent = text
        assert sent == final
        streamed += len(commits) > 1
        early += len(commits) > 1 and settled_text(tok, commits[0][0], stop_strings, commits[0][1]) != ""
    assert early > streamed // 2  # and not only at the end: most first blocks send text
