"""minidiff.data.readers, the list oracle of the data rules (tests/data_oracle.py: CPT drop/pack,
mixing, SFT labels), the chat rendering of SFT rows, and minidiff.data.batches (collate, Batches).

Expected values are written by hand from the file contents, dllm's template text and
the definitions in the docstrings, never taken from an earlier run of the code.
"""
from __future__ import annotations

import json
import sys
from collections import Counter

import data_oracle as oracle
import pytest
import torch
from helpers import EOS, PAD, make_tokenizer_dir

from minidiff.data import chat, readers
from minidiff.data.batches import Batches, collate_cpt, collate_sft
from minidiff.data.examples import IGNORE
from minidiff.data.tokenizer import tokenize_documents
from minidiff.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from minidiff.data.tokenizer import load_tokenizer

    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def write(path, content: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- readers


def test_txt_per_line_reports_bad_and_empty_lines(tmp_path):
    f = write(tmp_path / "a.txt", b"Merhaba d\xc3\xbcnya\r\n\xff\xfe bozuk\n\n   \nSon sat\xc4\xb1r\n")
    result = readers.read_documents(f)
    assert result.texts == ["Merhaba dünya", "Son satır"]
    assert result.problems == [f"{f}:2: invalid UTF-8", f"{f}:3: empty document", f"{f}:4: empty document"]
    assert "read 2 documents" in result.summary() and "1 invalid UTF-8" in result.summary()


def test_txt_per_file_and_directory_order(tmp_path):
    write(tmp_path / "b.txt", "ikinci\nbelge\n")
    write(tmp_path / "a.txt", b"birinci\n\xc3(\nbelge")  # line 2 is invalid UTF-8
    write(tmp_path / "notes.md", "ignored: not a supported extension")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.txt", "   \n")
    result = readers.read_documents(tmp_path, per="file")
    assert result.texts == ["birinci\nbelge", "ikinci\nbelge"]
    assert result.problems == [f"{tmp_path / 'a.txt'}:2: invalid UTF-8", f"{tmp_path / 'sub' / 'c.txt'}:1: empty document"]
    assert result.files == [str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/c.txt")]


def test_jsonl_field_and_problems(tmp_path):
    lines = [
        json.dumps({"body": "bir"}),
        json.dumps({"text": "yanlış alan"}),
        "",  # blank lines are not documents
        json.dumps({"body": ""}),
        json.dumps({"body": 7}),
        "{not json",
        json.dumps(["a list"]),
    ]
    f = write(tmp_path / "d.jsonl", ("\n".join(lines) + "\n").encode() + b'{"body": "\xff"}\n' + '{"body": "iki"}'.encode())
    result = readers.read_documents(f, field="body")
    assert result.texts == ["bir", "iki"]
    assert result.problems == [
        f"{f}:2: no field 'body'", f"{f}:4: empty document", f"{f}:5: field 'body' is not a string",
        f"{f}:6: not valid JSON", f"{f}:7: not a JSON object", f"{f}:8: invalid UTF-8",
    ]


def test_json_list_and_wrapped(tmp_path):
    a = write(tmp_path / "a.json", json.dumps([{"text": "x"}, {"text": ""}, 3]))
    b = write(tmp_path / "b.json", json.dumps({"data": [{"text": "y"}]}))
    result = readers.read_documents([a, b])
    assert result.texts == ["x", "y"]
    assert result.problems == [f"{a}:item 2: empty document", f"{a}:item 3: not a JSON object"]
    broken = write(tmp_path / "c.json", '[\n{"text": "x"},\n{oops}\n]')
    with pytest.raises(UserError, match=r"c\.json:3: not valid JSON"):
        readers.read_documents(broken)


def test_csv_multiline_bad_bytes_and_missing(tmp_path):
    content = 'id,text\n1,"iki\nsatır"\n2,\n'.encode() + b"3,\xe9t\xe9\n" + "4,son\n5\n".encode()
    f = write(tmp_path / "d.csv", content)
    result = readers.read_documents(f)
    assert result.texts == ["iki\nsatır", "son"]
    # line numbers are where each record starts: record 1 spans lines 2-3
    assert result.problems == [f"{f}:4: empty document", f"{f}:5: invalid UTF-8", f"{f}:7: no field 'text'"]


def test_csv_field_over_the_default_128_kb_limit_reads(tmp_path):
    """csv's default field limit is 131072 characters; a 200 kB document and an SFT answer of
    that size read whole, with the rows around them."""
    long_text = "uzun " * 40_000  # 200,000 characters
    f = write(tmp_path / "big.csv", f'text\nbaş\n"{long_text}"\nson\n')
    assert readers.read_documents(f).texts == ["baş", long_text, "son"]
    rows = write(tmp_path / "rows.csv", f'instruction,output\nSoru?,"{long_text}"\n')
    assert list(readers.read_rows(rows)) == [{"instruction": "Soru?", "output": long_text}]


def test_parquet_and_missing_pyarrow(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="parquet reading is the optional 'data' extra")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["bir", None, "üç"], "n": [1, 2, 3]}), f)
    result = readers.read_documents(f)
    assert result.texts == ["bir", "üç"] and result.problems == [f"{f}:row 2: no field 'text'"]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(UserError, match="needs pyarrow"):
        readers.read_documents(f)


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="nope.txt does not exist"):
        readers.read_documents(tmp_path / "nope.txt")
    with pytest.raises(UserError, match=r"x\.docx has an unsupported extension"):
        readers.read_documents(write(tmp_path / "x.docx", "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="contains no"):
        readers.read_documents(tmp_path / "empty")
    with pytest.raises(UserError, match="no documents left"):
        readers.read_documents(write(tmp_path / "blank.txt", b"\n \n\xff\n"))
    with pytest.raises(UserError, match="per="):
        readers.read_documents(tmp_path / "blank.txt", per="page")
    with pytest.raises(UserError, match="plain text"):
        readers.read_rows(tmp_path / "blank.txt")


def test_hf_sources(tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(UserError, match="not a hub dataset id"):
        readers.read_documents("hf://models/org/name")
    calls = []

    def fake_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        write(tmp_path / "snap" / "data" / "train.jsonl", json.dumps({"text": "hub"}) + "\n")
        write(tmp_path / "snap" / "README.md", "card")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert readers.read_documents("hf://datasets/org/name/data").texts == ["hub"]
    assert readers.read_documents("hf://datasets/org/name").texts == ["hub"]  # README.md is not data
    assert calls == [("org/name", "dataset", ["data", "data/*"]), ("org/name", "dataset", None)]

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"could not download hf://datasets/org/name .*couldn't connect"):
        readers.read_documents("hf://datasets/org/name")


def test_read_rows_keeps_places(tmp_path):
    f = write(tmp_path / "r.jsonl", '{"a": 1}\n\nnot json\n{"a": 2}\n')
    rows = readers.read_rows(f)
    assert list(rows) == [{"a": 1}, {"a": 2}]
    assert rows.where == [f"{f}:1", f"{f}:4"] and rows.problems == [f"{f}:3: not valid JSON"]


# ----------------------------------------------------------------------------- CPT


def test_tokenize_documents_has_no_specials(tok):
    ids = tokenize_documents(["Merhaba dünya", "Ankara"], tok)
    assert ids == [tok.encode("Merhaba dünya", add_special_tokens=False), tok.encode("Ankara", add_special_tokens=False)]
    assert all(t not in tok.special_ids for seq in ids for t in seq)


def test_cpt_drop_and_pack_by_hand():
    docs = [[5, 6], [7, 8, 9, 10], [], [11]]
    # drop: <bos>=2 doc <eos>=1, kept when length <= 5
    assert oracle.cpt_examples(docs, 5, "drop", eos_id=1, bos_id=2) == [[2, 5, 6, 1], [2, 11, 1]]
    assert oracle.cpt_examples(docs, 6, "drop", eos_id=1, bos_id=2) == [[2, 5, 6, 1], [2, 7, 8, 9, 10, 1], [2, 11, 1]]
    assert oracle.cpt_examples(docs, 3, "drop", eos_id=1) == [[5, 6, 1], [11, 1]]
    # pack: stream 5 6 1 7 8 9 10 1 11 1 -> blocks of 3, tail [1] dropped
    assert oracle.cpt_examples(docs, 3, "pack", eos_id=1) == [[5, 6, 1], [7, 8, 9], [10, 1, 11]]
    assert oracle.cpt_examples(docs, 5, "pack", eos_id=1) == [[5, 6, 1, 7, 8], [9, 10, 1, 11, 1]]
    with pytest.raises(UserError, match="CPT mode 'chunk'"):
        oracle.cpt_examples(docs, 5, "chunk", eos_id=1)


def test_mix_counts_and_ratios():
    wiki, web = [f"w{i}" for i in range(10)], [f"b{i}" for i in range(3)]
    mixed = oracle.mix_sources([wiki, web], counts=[4, 7], seed=1)
    counts = Counter(mixed)
    assert len(mixed) == 11 and sum(counts[w] for w in wiki) == 4 and all(counts[w] <= 1 for w in wiki)
    assert sorted(counts[b] for b in web) == [2, 2, 3]  # 7 = 2 whole copies + 1 more
    assert mixed == oracle.mix_sources([wiki, web], counts=[4, 7], seed=1)
    assert mixed != oracle.mix_sources([wiki, web], counts=[4, 7], seed=2)
    # ratios 1:3 with 10 and 9 items: total = min(10 / .25, 9 / .75) = 12 -> 3 + 9
    mixed = oracle.mix_sources([wiki, [f"b{i}" for i in range(9)]], ratios=[1, 3])
    assert sum(x.startswith("w") for x in mixed) == 3 and sum(x.startswith("b") for x in mixed) == 9
    assert sorted(oracle.mix_sources([wiki, web])) == sorted(wiki + web)
    with pytest.raises(UserError, match="either counts or ratios"):
        oracle.mix_sources([wiki, web], counts=[1, 1], ratios=[1, 1])
    with pytest.raises(UserError, match="mixing counts"):
        oracle.mix_sources([wiki, web], counts=[1])


def test_train_eval_split():
    train, held = oracle.train_eval_split(list(range(20)), 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(20)) and train == sorted(train)


# ----------------------------------------------------------------------------- SFT


ROWS = {
    "alpaca": {"instruction": " Başkent neresidir? ", "input": "Türkiye", "output": "Ankara."},
    "instructurca": {"Input": "Bir renk söyle.", "Output": "Mavi."},
    "messages": {"messages": [
        {"role": "system", "content": "Kısa cevap ver."},
        {"role": "user", "content": "Merhaba"},
        {"role": "assistant", "content": "Merhaba!"},
        {"role": "user", "content": "Nasılsın?"},
        {"role": "assistant", "content": " İyiyim. "},
    ]},
}
# dllm's chat template, written out by hand
PROMPTS = {
    "alpaca": "[Question]\nBaşkent neresidir?\n\nTürkiye\n[/Question]\n\n[Answer]\n",
    "instructurca": "[Question]\nBir renk söyle.\n[/Question]\n\n[Answer]\n",
    "messages": "[SYS]\nKısa cevap ver.\n[/SYS]\n\n[Question]\nMerhaba\n[/Question]\n\n[Answer]\nMerhaba!\n"
                "[/Answer]\n\n[Question]\nNasılsın?\n[/Question]\n\n[Answer]\n",
}
ANSWERS = {"alpaca": "Ankara.\n[/Answer]\n\n", "instructurca": "Mavi.\n[/Answer]\n\n", "messages": "İyiyim.\n[/Answer]\n\n"}


@pytest.mark.parametrize("fmt", chat.SFT_FORMATS)
def test_render_sft_matches_dllm_template(tok, fmt):
    assert chat.render_sft(ROWS[fmt], fmt, tok) == (PROMPTS[fmt], ANSWERS[fmt])


def test_alpaca_without_input(tok):
    prompt, _ = chat.render_sft({"instruction": "Say hi", "input": "  ", "output": "hi"}, "alpaca", tok)
    assert prompt == "[Question]\nSay hi\n[/Question]\n\n[Answer]\n"
    prompt, _ = chat.render_sft({"instruction": "Say hi", "output": "hi"}, "alpaca", tok)
    assert prompt == "[Question]\nSay hi\n[/Question]\n\n[Answer]\n"


@pytest.mark.parametrize("fmt", chat.SFT_FORMATS)
def test_sft_labels_prompt_ignored_answer_trained(tok, fmt):
    ids, labels = oracle.sft_example(ROWS[fmt], fmt, tok, 512)
    prompt_ids = tok.encode(PROMPTS[fmt], add_special_tokens=False)
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids and labels[:n] == [IGNORE] * n
    assert labels[n:] == ids[n:] and len(ids) > n and IGNORE not in labels[n:]
    assert tok.decode(ids, skip_special_tokens=False) == PROMPTS[fmt] + ANSWERS[fmt]
    assert not set(ids) & tok.special_ids


def test_sft_truncation_and_dropping(tok):
    row = ROWS["alpaca"]
    prompt_len = len(tok.encode(PROMPTS["alpaca"], add_special_tokens=False))
    full_ids, _ = oracle.sft_example(row, "alpaca", tok, 512)
    ids, labels = oracle.sft_example(row, "alpaca", tok, prompt_len + 2)
    assert ids == full_ids[:prompt_len + 2] and labels[prompt_len:] == full_ids[prompt_len:prompt_len + 2]
    assert oracle.sft_example(row, "alpaca", tok, prompt_len) is None  # no room for one answer token
    assert oracle.sft_example(row, "alpaca", tok, prompt_len - 5) is None
    long_row = {"instruction": "uzun " * 200, "output": "kısa"}
    rows = [row, long_row, ROWS["alpaca"]]
    examples, report = oracle.build_sft_examples(rows, "alpaca", tok, prompt_len + 2)
    assert len(examples) == 2 and (report.rows, report.kept, report.dropped_prompt_too_long, report.truncated) == (3, 2, 1, 2)
    _, report = oracle.build_sft_examples(rows, "alpaca", tok, 512)
    assert (report.kept, report.dropped_prompt_too_long, report.truncated) == (2, 1, 0)
    assert "1 dropped" in report.summary()
    with pytest.raises(UserError, match="all 1 SFT rows were dropped"):
        oracle.build_sft_examples([long_row], "alpaca", tok, 64)


def test_sft_bad_rows(tok, tmp_path):
    with pytest.raises(UserError, match="SFT format 'sharegpt' is unknown"):
        oracle.build_sft_examples([ROWS["alpaca"]], "sharegpt", tok, 64)
    f = write(tmp_path / "rows.jsonl", json.dumps(ROWS["alpaca"]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(UserError, match=rf"{f}:2: no field 'output'"):
        oracle.build_sft_examples(readers.read_rows(f), "alpaca", tok, 64)
    with pytest.raises(UserError, match="row 1: no field 'Input'/'Output'"):
        oracle.build_sft_examples([{"question": "a", "answer": "b"}], "instructurca", tok, 64)
    with pytest.raises(UserError, match="row 1: no field 'messages'"):
        oracle.build_sft_examples([ROWS["alpaca"]], "messages", tok, 64)
    with pytest.raises(UserError, match="last message has role 'user'"):
        oracle.build_sft_examples([{"messages": [{"role": "user", "content": "a"}]}], "messages", tok, 64)
    with pytest.raises(UserError, match=r"messages\[0\] is not"):
        oracle.build_sft_examples([{"messages": [{"role": "bot", "content": "a"}]}], "messages", tok, 64)


def test_chat_prompt_ids_match_training_prompt(tok):
    messages = chat.sft_messages(ROWS["messages"], "messages")[:-1]
    ids, labels = oracle.sft_example(ROWS["messages"], "messages", tok, 512)
    prompt = chat.chat_prompt_ids(messages, tok)
    assert ids[:len(prompt)] == prompt and labels.count(IGNORE) == len(prompt)


# ----------------------------------------------------------------------------- collate


def test_collate_sft_padding_is_trained():
    batch = [([10, 11, 12, 13], [IGNORE, IGNORE, 12, 13]), ([20, 21], [IGNORE, 21])]
    out = collate_sft(batch, PAD, EOS)
    assert out["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, PAD, PAD]]
    assert out["labels"].tolist() == [[IGNORE, IGNORE, 12, 13], [IGNORE, 21, PAD, PAD]]
    assert out["maskable"].tolist() == [[False, False, True, True], [False, True, True, True]]
    assert out["attention_mask"] is None
    out = collate_sft(batch, PAD, EOS, fill="eos", pad_to=5)
    assert out["input_ids"].tolist() == [[10, 11, 12, 13, EOS], [20, 21, EOS, EOS, EOS]]
    assert out["maskable"].tolist() == [[False, False, True, True, True], [False, True, True, True, True]]
    with pytest.raises(UserError, match="fill='eos'"):
        collate_sft(batch, PAD, fill="eos")


def test_collate_cpt():
    out = collate_cpt([[5, 6, 7], [8]], PAD)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["maskable"].dtype == torch.bool and out["maskable"].tolist() == [[True] * 3, [True, False, False]]
    assert collate_cpt([[5]], PAD, pad_to=3)["input_ids"].tolist() == [[5, PAD, PAD]]


# ----------------------------------------------------------------------------- Batches


def take(batches, n):
    return [next(batches) for _ in range(n)]


def test_batches_deterministic_epochs():
    examples = list(range(12))
    a, b = Batches(examples, 4, seed=7), Batches(examples, 4, seed=7)
    first = take(a, 9)
    assert first == take(b, 9) and a.steps_per_epoch == 3 and a.epoch == 2
    for epoch in range(3):  # each epoch is a permutation of all examples
        assert sorted(x for batch in first[3 * epoch:3 * epoch + 3] for x in batch) == examples
    assert first[:3] != first[3:6]
    assert take(Batches(examples, 4, seed=8), 3) != first[:3]


def test_batches_drop_last():
    b = Batches(list(range(10)), 4, seed=0)
    assert b.steps_per_epoch == 2
    seen = [x for batch in take(b, 2) for x in batch]
    assert len(set(seen)) == 8
    c = Batches(list(range(10)), 4, seed=0, drop_last=False)
    assert c.steps_per_epoch == 3
    batches = take(c, 3)
    assert all(len(x) == 4 for x in batches)
    assert set(x for batch in batches for x in batch) == set(range(10))
    assert batches[2][2:] == batches[0][:2]  # the last batch is completed from the epoch's start


def test_batches_resume_equals_uninterrupted():
    examples = [[i] for i in range(23)]
    collate = lambda batch: collate_cpt(batch, PAD)  # noqa: E731
    straight = take(Batches(examples, 3, seed=5, collate=collate), 17)
    first = Batches(examples, 3, seed=5, collate=collate)
    head = take(first, 9)  # crosses into epoch 1 (7 steps per epoch)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    second = Batches(examples, 3, seed=5, collate=collate)
    second.load_state_dict(state)
    rest = take(second, 8)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(head + rest, straight))
    with pytest.raises(UserError, match="global_batch_size=3"):
        Batches(examples, 4, seed=5).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_union_is_the_global_batch(world_size):
    examples = list(range(50))
    single = take(Batches(examples, 2 * world_size, seed=11), 10)
    ranks = [take(Batches(examples, 2, seed=11, rank=r, world_size=world_size), 10) for r in range(world_size)]
    for step in range(10):
        assert [x for r in range(world_size) for x in ranks[r][step]] == single[step]
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_batches_bad_inputs():
    with pytest.raises(UserError, match="fewer than one global batch"):
        Batches(list(range(5)), 4, world_size=2)
    with pytest.raises(UserError, match="rank=2"):
        Batches(list(range(5)), 1, rank=2, world_size=2)
