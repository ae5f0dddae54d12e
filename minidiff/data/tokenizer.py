"""A thin wrapper over a `tokenizers.Tokenizer` (tokenizer.json): special ids, batching, chat text.
References: mmBERT (arXiv 2509.06888: Gemma vocabulary, special ids); HF `tokenizers`; the template: chat.py.

    tok = load_tokenizer("jhu-clsp/mmBERT-base")     # or a directory holding tokenizer.json
    tok.mask_id, tok.pad_id, tok.eos_id, tok.bos_id  # 4, 0, 1, 2 for mmBERT
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from minidiff.data.batches import collate_cpt
from minidiff.data.chat import render_chat
from minidiff.errors import UserError
from minidiff.plumbing.checkpoint import TOKENIZER_FILES, resolve_model_dir
from minidiff.plumbing.files import write_json, write_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
MMBERT_RESERVED_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
ROLES = ("pad", "eos", "bos", "unk", "mask")
# token strings tried for each role before the config files' names (Gemma files may not flag <mask> as special)
CONVENTIONAL = {"pad": ["<pad>", "[PAD]"], "eos": ["<eos>", "</s>", "[SEP]"], "bos": ["<bos>", "<s>", "[CLS]"],
                "unk": ["<unk>", "[UNK]"], "mask": ["<mask>", "[MASK]"]}
# config-file keys that name each role (eos/bos fall back to sep/cls, as BERT-style files do)
CONFIG_KEYS = {"pad": ["pad_token"], "eos": ["eos_token", "sep_token"], "bos": ["bos_token", "cls_token"],
               "unk": ["unk_token"], "mask": ["mask_token"]}


def _token_string(value) -> str | None:
    # a config entry is a string or an AddedToken-like dict {"content": ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """tokenizer.json plus the special ids a masked diffusion model needs."""

    def __init__(self, backend, config: dict | None = None, source: str = "tokenizer"):
        self.backend = backend  # the tokenizers.Tokenizer
        self.config = dict(config or {})  # merged tokenizer_config.json + special_tokens_map.json
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for role in ROLES:  # self.pad_token, self.pad_id, ..., self.mask_token, self.mask_id
            token, token_id = self._lookup(role)
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_id", token_id)
        if self.mask_id is None:
            raise UserError(f"{source} has no mask token (looked for <mask>, [MASK] and a mask_token in "
                            "tokenizer_config.json); a masked diffusion model needs one")
        if self.pad_id is None:  # pad with eos when the vocabulary has no pad token
            self.pad_token, self.pad_id = self.eos_token, self.eos_id
        if self.pad_id is None:
            raise UserError(f"{source} has neither a pad nor an eos token; batches cannot be padded")
        flagged = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
        self.special_ids = flagged | {getattr(self, f"{role}_id") for role in ROLES} - {None}

    def _lookup(self, role: str) -> tuple[str | None, int | None]:
        for token in CONVENTIONAL[role] + [_token_string(self.config.get(key)) for key in CONFIG_KEYS[role]]:
            if token is not None and self.backend.token_to_id(token) is not None:
                return token, self.backend.token_to_id(token)
        return None, None

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, vocab_size={self.vocab_size}, pad={self.pad_id}, eos={self.eos_id}, "
                f"bos={self.bos_id}, unk={self.unk_id}, mask={self.mask_id})")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens framed by the file's post-processor (mmBERT: `<bos> ... <eos>`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D tensor); special ids (an unflagged <mask> too) skippable."""
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_encode(self, texts, add_special_tokens: bool = True, max_length: int | None = None):
        """(ids, attention_mask) [B, S], right-padded; max_length cuts each text so that it fits with its framing."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("batch_encode expects a list of str")
        specials = 0
        if add_special_tokens and self.backend.post_processor is not None:
            specials = self.backend.post_processor.num_special_tokens_to_add(False)
        if max_length is not None and max_length <= specials:
            raise UserError(f"max_length {max_length} leaves no room for text next to {specials} special tokens")
        rows = []
        for text in texts:
            encoding = self.backend.encode(text, add_special_tokens=False)
            if max_length is not None:
                encoding.truncate(max_length - specials)
            if add_special_tokens:
                encoding = self.backend.post_process(encoding, add_special_tokens=True)
            rows.append(encoding.ids)
        batch = collate_cpt(rows, self.pad_id, pad_to=max((len(r) for r in rows), default=0))
        return batch["input_ids"], batch["maskable"].long()

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """dllm's plain-text template, as transformers' method of the same name: see chat.render_chat."""
        return render_chat(messages, add_generation_prompt)

    def save(self, directory) -> Path:
        directory = Path(directory)
        special = {f"{role}_token": getattr(self, f"{role}_token") for role in ROLES
                   if getattr(self, f"{role}_token") is not None}
        write_text(directory / TOKENIZER_FILE, self.backend.to_str() + "\n")  # each file atomically
        write_json(directory / "tokenizer_config.json", {**self.config, **special})
        write_json(directory / "special_tokens_map.json", special)
        return directory


def tokenize_documents(texts, tokenizer) -> list[list[int]]:
    """Token ids of each document, no special tokens (the backend's batched encoder when it has one)."""
    backend = getattr(tokenizer, "backend", None)
    if hasattr(backend, "encode_batch"):
        return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def load_tokenizer(name_or_path, revision: str | None = None) -> Tokenizer:
    """A Tokenizer from a directory holding tokenizer.json (or that file itself, or a hub id)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file():
        file, directory = path, path.parent
    else:
        directory = resolve_model_dir(name_or_path, revision, allow_patterns=TOKENIZER_FILES)
        file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise UserError(f"{file} is missing; a tokenizer directory needs a tokenizers-format tokenizer.json")
    try:
        backend = Backend.from_file(str(file))
    except Exception as err:  # the Rust side raises a plain Exception on a malformed file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{file} is not a valid tokenizers file ({reason})") from None
    config: dict = {}
    for name in reversed(CONFIG_FILES):  # tokenizer_config.json wins over special_tokens_map.json
        if (directory / name).is_file():
            config.update(_read_json(directory / name))
    config.pop("added_tokens_decoder", None)
    return Tokenizer(backend, config, source=str(file))


def train_tokenizer(texts, vocab_size: int, out_dir=None) -> Tokenizer:
    """A small byte-fallback BPE with mmBERT's layout (specials 0-4, "▁", `<bos> $A <eos>`), saved to `out_dir`;
    vocab_size counts specials, learned pieces and 256 byte pieces (a tiny corpus can give fewer)."""
    texts = list(texts)
    if not texts:
        raise UserError("train_tokenizer needs at least one text")
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - 256, len(MMBERT_RESERVED_TOKENS)),
                                  special_tokens=MMBERT_RESERVED_TOKENS, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    # byte-fallback pieces <0x00>..<0xFF> as ordinary vocabulary entries, after the learned ones
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    backend = Backend.from_str(json.dumps(spec))
    bos, eos = MMBERT_RESERVED_TOKENS.index("<bos>"), MMBERT_RESERVED_TOKENS.index("<eos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    config = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
              "mask_token": "<mask>", "model_max_length": 8192}
    tok = Tokenizer(backend, config, source="trained tokenizer")
    if out_dir is not None:
        tok.save(out_dir)
        tok.source = str(Path(out_dir) / TOKENIZER_FILE)
    return tok
