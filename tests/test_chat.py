"""minidiff.data.chat: dllm's plain-text chat template, against the text written out by hand.

The SFT side (render_sft, chat_prompt_ids, labels) is checked in tests/test_data.py on the same
hand-written rows it trains on.
"""
import pytest
from helpers import make_tokenizer_dir

import minidiff
from minidiff.data import chat
from minidiff.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return minidiff.load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_chat_template(tok):
    user = {"role": "user", "content": "  Türkiye'nin başkenti neresidir?\n"}
    assert tok.apply_chat_template([user]) == (
        "[Question]\nTürkiye'nin başkenti neresidir?\n[/Question]\n\n[Answer]\n"
    )
    assert tok.apply_chat_template([user], add_generation_prompt=False) == (
        "[Question]\nTürkiye'nin başkenti neresidir?\n[/Question]\n\n"
    )
    system = {"role": "system", "content": "Kısa cevap ver. "}
    turns = [system, user, {"role": "assistant", "content": " Ankara."}, {"role": "user", "content": "Ya İzmir?"}]
    assert tok.apply_chat_template(turns) == (
        "[SYS]\nKısa cevap ver.\n[/SYS]\n\n"
        "[Question]\nTürkiye'nin başkenti neresidir?\n[/Question]\n\n"
        "[Answer]\nAnkara.\n[/Answer]\n\n"
        "[Question]\nYa İzmir?\n[/Question]\n\n"
        "[Answer]\n"
    )
    # a conversation ending with the assistant gets no new generation prompt (dllm's template)
    assert tok.apply_chat_template(turns[:3]) == (
        "[SYS]\nKısa cevap ver.\n[/SYS]\n\n"
        "[Question]\nTürkiye'nin başkenti neresidir?\n[/Question]\n\n"
        "[Answer]\nAnkara.\n[/Answer]\n\n"
    )


def test_chat_template_bad_messages(tok):
    with pytest.raises(UserError, match=r"chat message 1 has role 'bot'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(UserError, match=r"chat message 1 has role 'system'; expected only as the first message"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(UserError, match=r"chat message 0 must be a dict with a str 'content'"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(UserError, match=r"must be a list"):
        tok.apply_chat_template("hello")


def test_template_and_sampler_share_one_end_of_turn():
    # without a tokenizer: the template is plain text (markers are not special tokens)
    text = chat.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert text == "[Question]\na\n[/Question]\n\n[Answer]\nb\n[/Answer]\n\n"
    assert chat.END_OF_TURN == "[/Answer]" and chat.FORK_STOP_REPLACEMENT == "\n[/Answer]\n"
    from minidiff import sampler

    assert sampler.FORK_STOP_STRINGS is chat.FORK_STOP_STRINGS  # the stop rules read END_OF_TURN in chat itself
