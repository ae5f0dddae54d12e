"""The tokenizer wrapper against the raw `tokenizers.Tokenizer` and hand-written expectations."""
import json

import pytest
import torch
from helpers import BOS, EOS, MASK, PAD, TURKISH_TEXT, UNK, make_tokenizer_dir
from tokenizers import Tokenizer as RawTokenizer

import minidiff
from minidiff.data.tokenizer import load_tokenizer, train_tokenizer
from minidiff.errors import UserError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return minidiff.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def raw(tok_dir):
    return RawTokenizer.from_file(str(tok_dir / "tokenizer.json"))


def test_special_ids(tok, raw):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (PAD, EOS, BOS, UNK, MASK) == (0, 1, 2, 3, 4)
    assert [raw.id_to_token(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.vocab_size == raw.get_vocab_size() == len(tok)
    assert raw.token_to_id("<0xC4>") not in tok.special_ids  # byte pieces are ordinary vocabulary


def test_framing_bos_text_eos(tok, raw):
    text = "Işık hızı"
    content = raw.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == [BOS, *content, EOS]
    assert tok.encode(text, add_special_tokens=False) == content


def test_turkish_round_trip(tok, raw):
    letters = "ı İ ş Ş ğ Ğ ü Ü ö Ö ç Ç"
    for text in [*TURKISH_TEXT, letters, "Kız çocuğu İğdır'a gitti; ağaç, süt, öğün."]:
        ids = tok.encode(text)
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == raw.decode(ids, skip_special_tokens=False)
    # a character the tiny BPE never saw goes through byte fallback and comes back intact
    rare = "Ωmega ǅ"
    assert tok.decode(tok.encode(rare)) == rare
    assert UNK not in tok.encode(rare)
    # tensors decode too
    assert tok.decode(torch.tensor(tok.encode(letters))) == letters


def test_batch_right_padding(tok, raw):
    texts = ["Merhaba dünya, bugün hava çok güzel.", "Evet", "Şöyle böyle"]
    ids, attention_mask = tok.batch_encode(texts)
    rows = [raw.encode(t).ids for t in texts]
    width = max(map(len, rows))
    assert ids.shape == attention_mask.shape == (3, width)
    assert ids.dtype == attention_mask.dtype == torch.long
    for b, row in enumerate(rows):
        expected = row + [PAD] * (width - len(row))
        assert ids[b].tolist() == expected
        assert attention_mask[b].tolist() == [1] * len(row) + [0] * (width - len(row))
    # truncation keeps the framing: <bos> + first (max_length - 2) pieces + <eos>
    ids, attention_mask = tok.batch_encode(texts, max_length=5)
    assert ids[0].tolist() == [BOS, *rows[0][1:4], EOS]
    assert attention_mask.sum(1).tolist() == [5, min(5, len(rows[1])), min(5, len(rows[2]))]
    # no specials
    ids, _ = tok.batch_encode(["Evet"], add_special_tokens=False)
    assert ids[0].tolist() == raw.encode("Evet", add_special_tokens=False).ids


def test_mask_not_flagged_special(tmp_path, raw):
    """As in some Gemma files: <mask> is an ordinary vocabulary entry; it is found by its string."""
    spec = json.loads(raw.to_str())
    for added in spec["added_tokens"]:
        if added["content"] == "<mask>":
            added["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")  # no config files
    tok = load_tokenizer(tmp_path)
    assert tok.mask_id == MASK and MASK in tok.special_ids
    assert tok.decode([BOS, tok.mask_id, EOS]) == ""  # skipped like any special id


def test_mask_from_tokenizer_config(tmp_path, raw):
    """A mask token under another name is taken from tokenizer_config.json."""
    spec = json.loads(raw.to_str())
    for added in spec["added_tokens"]:
        if added["content"] == "<mask>":
            added["content"] = "<|maske|>"
    spec["model"]["vocab"]["<|maske|>"] = spec["model"]["vocab"].pop("<mask>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(UserError, match=r"tokenizer.json has no mask token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": {"content": "<|maske|>"}}))
    assert load_tokenizer(tmp_path).mask_id == MASK


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path / 'tokenizer.json'} is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match=r"tokenizer.json is not a valid tokenizers file"):
        load_tokenizer(tmp_path)


def test_bad_arguments(tok):
    with pytest.raises(UserError, match=r"max_length 2 leaves no room"):
        tok.batch_encode(["Evet"], max_length=2)
    with pytest.raises(TypeError):
        tok.batch_encode("Evet")
    with pytest.raises(TypeError):
        tok.encode(["Evet"])


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.backend.to_str() == tok.backend.to_str()
    assert (again.pad_id, again.eos_id, again.bos_id, again.mask_id) == (PAD, EOS, BOS, MASK)
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["mask_token"] == "<mask>"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # no temporaries left


def test_train_tokenizer_matches_helper_layout(tmp_path):
    """train_tokenizer(texts, n + 256) builds exactly the file helpers.make_tokenizer_dir(n) writes
    (which is written directly against the tokenizers library)."""
    reference = RawTokenizer.from_file(str(make_tokenizer_dir(tmp_path / "ref", vocab_size=300) / "tokenizer.json"))
    trained = train_tokenizer(TURKISH_TEXT * 4, vocab_size=300 + 256, out_dir=tmp_path / "ours")
    assert trained.backend.to_str() == reference.to_str()
    assert trained.vocab_size == reference.get_vocab_size()
    assert (trained.pad_id, trained.eos_id, trained.bos_id, trained.unk_id, trained.mask_id) == (0, 1, 2, 3, 4)
    assert load_tokenizer(tmp_path / "ours").encode("Işık") == reference.encode("Işık").ids
    with pytest.raises(UserError, match="at least one text"):
        train_tokenizer([], 300)
