"""Token shards on disk: a corpus tokenised once into flat memory-mapped token files, kept in a
cache that is either complete and valid or ignored.

References: nanoGPT's data/*/prepare.py (one flat `train.bin` of uint16 token ids read back with
`np.memmap`), Hugging Face datasets (an Arrow cache keyed by a fingerprint of the inputs).

    python -m minidiff.shards prepare --tokenizer DIR --data wiki.txt --out shards/wiki
    shard = shards.open_source("wiki.txt", "cpt", {"field": "text", "per": "line"}, tok)  # cached
    shard.tokens, shard.offsets     # memmaps: document d is tokens[offsets[d]:offsets[d + 1]]

An entry is one directory:
- tokens.bin: every document's ids (no special tokens), one after another; uint16 when the
  vocabulary has <= 65536 entries, else uint32;
- offsets.bin: int64 [documents + 1], document boundaries into tokens.bin;
- prompt_lengths.bin (SFT entries only): int64 [rows], the prompt's share of each row's ids
  (a row is prompt ids then answer ids);
- manifest.json, written last: format version, kind and reading options, every source file's
  path, size and BLAKE2b hash, the tokenizer files' hash, counts, dtype, the reading summary.
A cache entry lives at CACHE/<key>, key = a hash of everything in the manifest that decides its
contents. It is written into a private temporary directory and published with one rename of
the directory; a killed preparation leaves only that temporary directory, which no reader
trusts (and a later preparation deletes). A lock file (fcntl.flock) lets a second process
wait for the first instead of tokenising twice; if the lock is not honoured (some network
file systems), both write and the loser of the rename discards its copy.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data
from .files import write_json
from .errors import UserError, run_cli

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH_DOCUMENTS = 2048             # documents per encode_batch call: the writer's memory bound
BATCH_CHARACTERS = 8 * 1024 * 1024  # ... or this many characters, whichever comes first
KINDS = ("cpt", "sft")


def default_cache_dir() -> Path:
    """$MINIDIFF_SHARD_CACHE, else $MINIDIFF_CACHE/shards, else ~/.cache/minidiff/shards."""
    if os.environ.get("MINIDIFF_SHARD_CACHE"):
        return Path(os.environ["MINIDIFF_SHARD_CACHE"]).expanduser()
    root = os.environ.get("MINIDIFF_CACHE") or Path.home() / ".cache" / "minidiff"
    return Path(root).expanduser() / "shards"


def token_dtype(vocab_size: int):
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ============================================================================ reading an entry


@dataclass
class Shard:
    """An opened entry: memory-mapped arrays plus its manifest."""

    path: Path
    manifest: dict
    tokens: np.ndarray          # [T] uint16/uint32 memmap
    offsets: np.ndarray         # [D + 1] int64 memmap
    prompt_lengths: np.ndarray | None  # [D] int64 memmap (SFT)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [D]


def _map(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:  # np.memmap refuses an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def read_entry(path: Path) -> Shard | None:
    """The entry at `path`, or None unless it is complete: a manifest of this format version and
    files of exactly the sizes it states."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") not in KINDS:
            return None
        dtype = np.dtype(manifest["dtype"])
        docs, total = int(manifest["documents"]), int(manifest["tokens"])
        sizes = {"tokens.bin": total * dtype.itemsize, "offsets.bin": (docs + 1) * 8}
        if manifest["kind"] == "sft":
            sizes["prompt_lengths.bin"] = docs * 8
        if any((path / name).stat().st_size != size for name, size in sizes.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    prompts = _map(path / "prompt_lengths.bin", np.int64, docs) if manifest["kind"] == "sft" else None
    return Shard(path, manifest, _map(path / "tokens.bin", dtype, total),
                 _map(path / "offsets.bin", np.int64, docs + 1), prompts)


# ============================================================================ the cache key


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """BLAKE2b of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of tokenizer.json and the config files next to it (they decide ids and specials)."""
    from .tokenizer import CONFIG_FILES

    file = Path(tokenizer.source)
    digest = hashlib.blake2b(digest_size=20)
    for part in [file] + [file.parent / name for name in CONFIG_FILES]:
        digest.update(part.name.encode() + b"\0" + (file_hash(part).encode() if part.is_file() else b"-"))
    return digest.hexdigest()


def describe(source, kind: str, options: dict, tokenizer) -> dict:
    """What decides an entry's contents: kind, reading options, each file (path, size, hash),
    the tokenizer's hash; `key` is their hash."""
    if kind not in KINDS:
        raise UserError(f"shard kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
    files = data.resolve_sources(source)
    identity = {
        "format_version": FORMAT_VERSION, "kind": kind, "options": dict(sorted(options.items())),
        "sources": [{"path": str(p.resolve()), "size": p.stat().st_size, "blake2b": file_hash(p)} for p in files],
        "tokenizer": tokenizer_hash(tokenizer),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return {**identity, "key": key}


# ============================================================================ writing an entry


def _batches(items, size=len):
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


class _Writer:
    """Appends documents (id lists) to tokens.bin / offsets.bin (and prompt lengths) in `folder`."""

    def __init__(self, folder: Path, dtype, sft: bool):
        self.dtype, self.documents, self.total = dtype, 0, 0
        self.tokens = open(folder / "tokens.bin", "wb")
        self.offsets = open(folder / "offsets.bin", "wb")
        self.prompts = open(folder / "prompt_lengths.bin", "wb") if sft else None
        self.offsets.write(np.zeros(1, np.int64).tobytes())

    def add(self, id_lists: list[list[int]], prompt_lengths: list[int] | None = None) -> None:
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))  # [n]
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=self.dtype, count=int(lengths.sum()))
        self.tokens.write(flat.tobytes())
        # offsets[d + 1] = offsets[d] + len(doc d)
        self.offsets.write((self.total + np.cumsum(lengths)).tobytes())
        if self.prompts is not None:
            self.prompts.write(np.asarray(prompt_lengths, dtype=np.int64).tobytes())
        self.documents += len(id_lists)
        self.total += int(lengths.sum())

    def close(self) -> None:
        for handle in (self.tokens, self.offsets, self.prompts):
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()


def _progress(enabled: bool, what: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface-hub; without it, no bar
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n): ...
            def close(self): ...
        return _Silent()
    return tqdm(desc=f"tokenising {what}", unit=" docs", file=sys.stderr, dynamic_ncols=True)


def _write_cpt(files, options: dict, tokenizer, writer: _Writer, bar, problems: list[str]) -> None:
    texts = data.iter_documents(files, problems, field=options.get("field", "text"), per=options.get("per", "line"))
    for batch in _batches(texts):
        writer.add(data.tokenize_documents(batch, tokenizer))
        bar.update(len(batch))


def _write_sft(files, options: dict, tokenizer, writer: _Writer, bar, problems: list[str]) -> None:
    """Each row as prompt ids + answer ids (data._encode_sft's rule, with batched encoding)."""
    fmt = options["format"]
    if fmt not in data.SFT_FORMATS:
        raise UserError(f"SFT format {fmt!r} is unknown; expected one of {', '.join(data.SFT_FORMATS)}")
    for path in files:
        if path.suffix.lower() in data.TEXT_EXTENSIONS:
            raise UserError(f"{path} is plain text; rows must come from a .jsonl, .json, .csv or .parquet file")
    rows = (pair for path in files for pair in data._iter_rows(path, problems))
    for batch in _batches(rows, size=lambda pair: 1):
        texts = [data.render_sft(row, fmt, tokenizer, where) for where, row in batch]
        prompt_ids = data.tokenize_documents([p for p, _ in texts], tokenizer)
        full_ids = data.tokenize_documents([p + a for p, a in texts], tokenizer)
        joined = []
        for (_, answer), prompt, full in zip(texts, prompt_ids, full_ids):
            if full[:len(prompt)] != prompt:  # a BPE merge crossed the boundary: the answer alone
                full = prompt + list(tokenizer.encode(answer, add_special_tokens=False))
            joined.append(full)
        writer.add(joined, [len(p) for p in prompt_ids])
        bar.update(len(batch))


def write_entry(identity: dict, tokenizer, target: Path, *, progress: bool = False, label: str = "") -> Shard:
    """Tokenise the sources `identity` names into `target` (which must not exist yet): a private
    temporary directory next to it, manifest last, then one rename. If another process
    published `target` first, this copy is discarded and theirs returned."""
    files = [Path(s["path"]) for s in identity["sources"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(target.parent)
    tmp = target.parent / f".tmp-{target.name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started, problems = time.perf_counter(), []
        dtype = token_dtype(tokenizer.vocab_size)
        writer = _Writer(tmp, dtype, identity["kind"] == "sft")
        bar = _progress(progress, label or files[0].name)
        try:
            (_write_sft if identity["kind"] == "sft" else _write_cpt)(
                files, identity["options"], tokenizer, writer, bar, problems)
        finally:
            bar.close()
            writer.close()
        _check_not_empty(identity, writer.documents, problems, label)
        manifest = {**identity, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                    "documents": writer.documents, "tokens": writer.total, "skipped": len(problems),
                    "read_summary": _read_summary(identity, writer.documents, problems),
                    "seconds": round(time.perf_counter() - started, 3)}
        write_json(tmp / MANIFEST, manifest, indent=1, fsync=True)
        try:
            os.rename(tmp, target)  # atomic; fails when target exists (another process won)
        except OSError:
            if read_entry(target) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    entry = read_entry(target)
    if entry is None:
        raise UserError(f"{target} exists but is not a complete shard directory; remove it and run again")
    return entry


def _check_not_empty(identity: dict, documents: int, problems: list[str], label: str) -> None:
    """The errors read_documents / read_rows raise when nothing is left."""
    if documents:
        return
    name = label or ", ".join(s["path"] for s in identity["sources"])
    if identity["kind"] == "sft":
        rows = data.Rows(problems=problems, files=[s["path"] for s in identity["sources"]])
        raise UserError(f"no rows found in {name} ({rows.summary(1)})")
    first = f"; the first: {problems[0]}" if problems else ""
    raise UserError(f"no documents left in {name}: {len(problems):,} lines/rows were "
                    f"skipped{first}; expected at least one non-empty document")


def _read_summary(identity: dict, documents: int, problems: list[str]) -> str:
    files = [s["path"] for s in identity["sources"]]
    if identity["kind"] == "sft":
        return data.Rows(problems=problems, files=files).summary().replace(
            "read 0 rows", f"read {documents:,} rows", 1)
    return data.ReadResult(texts=range(documents), problems=problems, files=files).summary()


def _host() -> str:
    return socket.gethostname().replace("-", "_")  # no "-": temporary names are split on it


def _remove_dead_temporaries(folder: Path) -> None:
    """Delete temporary directories of killed preparations on this host (their pid is gone)."""
    host = _host()
    for tmp in folder.glob(".tmp-*"):
        parts = tmp.name.rsplit("-", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


# ============================================================================ the cache


def prepare(source, kind: str, options: dict, tokenizer, *, out=None, cache_dir=None,
            progress: bool = False, say=None) -> Shard:
    """The entry for `source` (a path, directory or list of them: one training source): reused
    from `out` or the cache when it is complete and its key matches, else written now. Holding
    an exclusive lock on <entry>.lock while checking and writing, so concurrent callers
    tokenise once."""
    identity = describe(source, kind, options, tokenizer)
    folder = Path(out).expanduser() if out is not None else Path(cache_dir or default_cache_dir()) / identity["key"]
    if out is not None and folder.exists() and read_entry(folder) is None and any(folder.iterdir()):
        raise UserError(f"--out {folder} exists and is not a shard directory; choose a new or empty directory")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entry = read_entry(folder)
        if entry is not None and entry.manifest.get("key") == identity["key"]:
            if say is not None:
                say(f"{data._name(source)}: token shards found in the cache, {folder}")
            return entry
        if folder.exists():  # stale: other sources, tokenizer or format; set aside, then delete
            aside = folder.parent / f".tmp-{folder.name}-{_host()}-{os.getpid()}-old"
            os.rename(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        entry = write_entry(identity, tokenizer, folder, progress=progress, label=data._name(source))
    if say is not None:
        m = entry.manifest
        say(f"prepared {data._name(source)}: {m['documents']:,} documents, {m['tokens']:,} tokens, "
            f"{m['skipped']:,} lines/rows skipped, {m['seconds']:.1f} s -> {folder}")
    return entry


def is_shard_dir(source) -> bool:
    return not str(source).startswith(data.HF_PREFIX) and (Path(str(source)).expanduser() / MANIFEST).is_file()


def open_prepared(path, kind: str, options: dict, tokenizer) -> Shard:
    """A directory written by `prepare --out`: complete, of this kind and options, and made with
    this tokenizer, else UserError."""
    folder = Path(str(path)).expanduser()
    entry = read_entry(folder)
    if entry is None:
        raise UserError(f"{folder} is not a complete shard directory (format {FORMAT_VERSION}); prepare it again")
    m = entry.manifest
    if m["kind"] != kind:
        raise UserError(f"{folder} holds {m['kind']} shards; this run needs {kind} shards")
    if m["options"] != dict(sorted(options.items())):
        raise UserError(f"{folder} was prepared with {m['options']}; this run reads sources with "
                        f"{dict(sorted(options.items()))}: prepare it again with the same options")
    if m["tokenizer"] != tokenizer_hash(tokenizer):
        raise UserError(f"{folder} was prepared with another tokenizer; prepare it again with {tokenizer.source}")
    return entry


def open_source(source, kind: str, options: dict, tokenizer, *, cache_dir=None, progress: bool = False,
                distributed=None, say=None) -> Shard:
    """A training source as a Shard: a prepared shard directory as is, anything else through
    the cache. Under torchrun (`distributed` a trainer.DistContext with world_size > 1) the
    first process of each node prepares while the others wait at a barrier, then all map the
    same files."""
    if is_shard_dir(source):
        return open_prepared(source, kind, options, tokenizer)
    if distributed is None or not distributed.enabled:
        return prepare(source, kind, options, tokenizer, cache_dir=cache_dir, progress=progress, say=say)
    import torch.distributed as dist

    entry = None
    if distributed.local_rank == 0:
        entry = prepare(source, kind, options, tokenizer, cache_dir=cache_dir, progress=progress, say=say)
    dist.barrier()  # a failed preparation ends rank 0's process; torchrun then stops the others
    if entry is None:
        entry = prepare(source, kind, options, tokenizer, cache_dir=cache_dir)  # finds the entry, no writing
    return entry


# ============================================================================ command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minidiff.shards",
        description="Tokenise training sources once into memory-mapped token shards (e.g. on a CPU "
                    "machine before a GPU job); pass the --out directory as --data of train_cpt.py / train_sft.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenise one training source into a shard directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json), the model's")
    p.add_argument("--data", required=True, nargs="+", help="files/directories forming ONE source (run once per source to mix)")
    p.add_argument("--out", help="shard directory to write (default: the cache entry, printed)")
    p.add_argument("--cache-dir", help=f"cache directory when no --out (default: {default_cache_dir()})")
    p.add_argument("--kind", choices=KINDS, default="cpt", help="cpt documents or sft rows (default: cpt)")
    p.add_argument("--text-field", default="text", help="CPT: column holding the text in row files")
    p.add_argument("--per-file", action="store_true", help="CPT: a whole .txt file is one document")
    p.add_argument("--format", choices=data.SFT_FORMATS, default="alpaca", help="SFT: row format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def error(message):
        raise UserError(f"{message} (see --help)")
    parser.error = p.error = error
    args = parser.parse_args(argv)
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    options = cpt_options(args.text_field, args.per_file) if args.kind == "cpt" else sft_options(args.format)
    started = time.perf_counter()
    entry = prepare(args.data, args.kind, options, tok, out=args.out, cache_dir=args.cache_dir,
                    progress=not args.no_progress)
    m, seconds = entry.manifest, time.perf_counter() - started
    print(m["read_summary"], file=sys.stderr)
    print(f"{m['documents']:,} {'rows' if args.kind == 'sft' else 'documents'}, {m['tokens']:,} tokens "
          f"({m['dtype']}), {m['skipped']:,} lines/rows skipped; tokenised in {m['seconds']:.1f} s, "
          f"this call {seconds:.1f} s -> {entry.path}")
    return 0


def cpt_options(text_field: str = "text", per_file: bool = False) -> dict:
    return {"field": text_field, "per": "file" if per_file else "line"}


def sft_options(fmt: str) -> dict:
    return {"format": fmt}


if __name__ == "__main__":
    run_cli(main)
