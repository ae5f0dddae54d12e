"""Tokenising one training source into a shard's .bin files, a bounded batch at a time, each batch appended
and hashed as it is written (docs/training.md, "Token shards"). References: nanoGPT's data/*/prepare.py.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from minidiff.data import readers
from minidiff.data.chat import SFT_FORMATS, render_sft
from minidiff.data.tokenizer import tokenize_documents
from minidiff.errors import UserError
from minidiff.plumbing.files import new_digest
from minidiff.plumbing.progress import bar as progress_bar

FILE_NAMES = {"cpt": ("tokens.bin", "offsets.bin"), "sft": ("tokens.bin", "offsets.bin", "prompt_lengths.bin")}
BATCH_DOCUMENTS = 2048             # documents per encode_batch call: the writer's memory bound
BATCH_CHARACTERS = 8 * 1024 * 1024  # ... or this many characters, whichever comes first


class Writer:
    """Appends documents (id lists) to the files of `kind` in `folder`, hashing every byte."""

    def __init__(self, folder: Path, dtype, kind: str):
        self.dtype, self.documents, self.total = dtype, 0, 0
        self.handles = {name: open(folder / name, "wb") for name in FILE_NAMES[kind]}
        self.digests = {name: new_digest() for name in self.handles}
        self._write("offsets.bin", np.zeros(1, np.int64))

    def _write(self, name: str, array: np.ndarray) -> None:
        raw = array.tobytes()
        self.handles[name].write(raw)
        self.digests[name].update(raw)

    def add(self, id_lists: list[list[int]], prompt_lengths: list[int] | None = None) -> None:
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))  # [n]
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=self.dtype, count=int(lengths.sum()))
        self._write("tokens.bin", flat)
        # offsets[d + 1] = offsets[d] + len(doc d)
        self._write("offsets.bin", self.total + np.cumsum(lengths))
        if "prompt_lengths.bin" in self.handles:
            self._write("prompt_lengths.bin", np.asarray(prompt_lengths, dtype=np.int64))
        self.documents += len(id_lists)
        self.total += int(lengths.sum())

    def close(self) -> dict:
        written = {}
        for name, handle in self.handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            written[name] = {"size": handle.tell(), "blake2b": self.digests[name].hexdigest()}
            handle.close()
        return written


def batches(items, size=len):
    """Lists of up to BATCH_DOCUMENTS items or BATCH_CHARACTERS characters."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += size(item)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARACTERS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_files(folder: Path, sources: list[Path], kind: str, options: dict, tokenizer, dtype, *,
                progress: bool = False, label: str = "") -> dict:
    problems: list[str] = []  # lines and rows skipped, as FILE:LINE and why
    writer = Writer(folder, dtype, kind)
    bar = progress_bar(desc=f"tokenising {label or sources[0].name}", unit="docs", disable=not progress)
    try:
        (_tokenise_rows if kind == "sft" else _tokenise_documents)(sources, options, tokenizer, writer, bar, problems)
    finally:
        bar.close()
        written = writer.close()
    return {"documents": writer.documents, "tokens": writer.total, "skipped": len(problems),
            "read_summary": read_summary(sources, kind, writer.documents, problems, label), "files": written}


def read_summary(sources: list[Path], kind: str, documents: int, problems: list[str], label: str) -> str:
    """What read_documents / read_rows would say of these sources, or raise when nothing is left."""
    paths = [str(p) for p in sources]
    rows, name = readers.Rows(problems=problems, files=paths), label or ", ".join(paths)
    if not documents and kind == "sft":
        raise UserError(f"no rows found in {name} ({rows.summary(1)})")
    if not documents:
        raise readers.nothing_left(name, problems)
    if kind == "sft":
        return rows.summary().replace("read 0 rows", f"read {documents:,} rows", 1)
    return readers.ReadResult(texts=range(documents), problems=problems, files=paths).summary()


def _tokenise_documents(sources: list[Path], options: dict, tokenizer, writer: Writer, bar, problems: list[str]):
    texts = readers.iter_documents(sources, problems, field=options.get("field", "text"),
                                   per=options.get("per", "line"))
    for batch in batches(texts):
        writer.add(tokenize_documents(batch, tokenizer))
        bar.update(len(batch))


def _tokenise_rows(sources: list[Path], options: dict, tokenizer, writer: Writer, bar, problems: list[str]):
    """Each row as prompt ids (tokenised alone, as a sampler sees it) + the rest of the whole text's ids, or the
    answer tokenised alone when a BPE merge crosses the boundary."""
    fmt = options["format"]
    if fmt not in SFT_FORMATS:
        raise UserError(f"SFT format {fmt!r} is unknown; expected one of {', '.join(SFT_FORMATS)}")
    for batch in batches(readers.iter_rows(sources, problems), size=lambda pair: 1):
        texts = [render_sft(row, fmt, tokenizer, where) for where, row in batch]
        prompt_ids = tokenize_documents([p for p, _ in texts], tokenizer)
        full_ids = tokenize_documents([p + a for p, a in texts], tokenizer)
        joined = []
        for (_, answer), prompt, full in zip(texts, prompt_ids, full_ids):
            if full[:len(prompt)] != prompt:
                full = prompt + list(tokenizer.encode(answer, add_special_tokens=False))
            joined.append(full)
        writer.add(joined, [len(p) for p in prompt_ids])
        bar.update(len(batch))
