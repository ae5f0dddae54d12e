"""Token shards: the on-disk format of a tokenised corpus, its verification, and the cache of entries
(the layout and every rule: docs/training.md, "Token shards"), and the `prepare` command.
References: nanoGPT's prepare.py (one flat uint16 `train.bin`, `np.memmap`), datasets' fingerprinted cache.

    shard = shards.open_source("wiki.txt", "cpt", shards.cpt_options(), tok)  # cached, verified
    shard.tokens, shard.offsets     # memmaps: document d is tokens[offsets[d]:offsets[d + 1]]
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidiff.data import readers
from minidiff.data.shard_writer import FILE_NAMES, write_files
from minidiff.data.chat import SFT_FORMATS
from minidiff.data.tokenizer import CONFIG_FILES, load_tokenizer
from minidiff.errors import UserError, run_cli
from minidiff.plumbing import files
from minidiff.plumbing.files import file_hash, new_digest
from minidiff.plumbing.flags import Parser

FORMAT_VERSION = 2                  # 2: the manifest holds each .bin file's size and hash
MANIFEST = "manifest.json"
READ_CHUNK = 8 * 1024 * 1024       # bytes per read when hashing or verifying (a multiple of 8)
KINDS = ("cpt", "sft")


def default_cache_dir() -> Path:
    if os.environ.get("MINIDIFF_SHARD_CACHE"):
        return Path(os.environ["MINIDIFF_SHARD_CACHE"]).expanduser()
    root = os.environ.get("MINIDIFF_CACHE") or Path.home() / ".cache" / "minidiff"
    return Path(root).expanduser() / "shards"


def token_dtype(vocab_size: int):
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _blocks(path: Path, dtype, digest, chunk: int = READ_CHUNK):
    """The file as arrays of `dtype`, `chunk` bytes at a time, fed to `digest`; one reused buffer."""
    dtype, buffer = np.dtype(dtype), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while size := handle.readinto(view):  # full chunks until the last (BufferedReader)
            digest.update(view[:size])
            yield np.frombuffer(buffer, dtype=dtype, count=size // dtype.itemsize)


class EntryProblem(Exception):
    """Why an entry on disk cannot be used, as a phrase naming the file ("tokens.bin has ...")."""


@dataclass
class Shard:
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

    @property
    def content_key(self) -> str:
        """`<key>-<hash of the files' hashes>`: what the entry was made from, then what it holds."""
        listed = self.manifest["files"]
        # content = BLAKE2b("name:hash;name:hash..." over the entry's files, sorted by name)
        listing = ";".join(f"{name}:{listed[name]['blake2b']}" for name in sorted(listed))
        content = hashlib.blake2b(listing.encode(), digest_size=10).hexdigest()
        return f"{self.manifest['key']}-{content}"


def _map(path: Path, dtype, count: int) -> np.ndarray:  # np.memmap refuses an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EntryProblem(f"{MANIFEST} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EntryProblem(f"{MANIFEST} is not readable JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise EntryProblem(f"{MANIFEST} holds a JSON {type(manifest).__name__}, not an object")
    return manifest


def _expected_sizes(manifest: dict) -> dict[str, int]:
    """Each .bin file's size as the manifest's kind, dtype and counts make it (EntryProblem when a field is bad)."""
    missing = [name for name in ("key", "entry_id", "kind", "dtype", "documents", "tokens", "files")
               if name not in manifest]
    if missing:
        raise EntryProblem(f"{MANIFEST} lacks {', '.join(missing)}")
    try:
        kind, dtype = manifest["kind"], np.dtype(manifest["dtype"])
        docs, total = int(manifest["documents"]), int(manifest["tokens"])
        stated = {name: (int(manifest["files"][name]["size"]), str(manifest["files"][name]["blake2b"]))
                  for name in FILE_NAMES[kind]}
    except (KeyError, TypeError, ValueError) as err:
        raise EntryProblem(f"{MANIFEST} holds a malformed field ({err!r})") from None
    if kind not in KINDS or dtype not in (np.uint16, np.uint32) or docs < 0 or total < 0:
        raise EntryProblem(f"{MANIFEST} states kind {kind!r}, dtype {dtype.name}, {docs} documents and "
                           f"{total} tokens; expected cpt/sft, uint16/uint32 and counts >= 0")
    sizes = {"tokens.bin": total * dtype.itemsize, "offsets.bin": (docs + 1) * 8, "prompt_lengths.bin": docs * 8}
    for name, (size, _) in stated.items():
        if size != sizes[name]:
            raise EntryProblem(f"{MANIFEST} states {size:,} bytes for {name}; its counts make {sizes[name]:,}")
    return {name: sizes[name] for name in stated}


def load_entry(path: Path) -> Shard:
    """The entry at `path` if its manifest is of this format and its files of the sizes it states; no file is read."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EntryProblem(f"it has shard format {manifest.get('format_version')}; this minidiff reads "
                           f"format {FORMAT_VERSION}")
    for name, size in _expected_sizes(manifest).items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            raise EntryProblem(f"{name} is missing") from None
        if actual != size:
            raise EntryProblem(f"{name} has {actual:,} bytes; the manifest states {size:,}")
    dtype, docs, total = np.dtype(manifest["dtype"]), int(manifest["documents"]), int(manifest["tokens"])
    prompts = _map(path / "prompt_lengths.bin", np.int64, docs) if manifest["kind"] == "sft" else None
    return Shard(path, manifest, _map(path / "tokens.bin", dtype, total),
                 _map(path / "offsets.bin", np.int64, docs + 1), prompts)


def read_entry(path: Path) -> Shard | None:
    try:
        return load_entry(path)
    except EntryProblem:
        return None


def _ids_problem(blocks, vocab_size: int) -> str | None:
    top = max((int(ids.max()) for ids in blocks), default=-1)
    # every id < vocab_size (the embedding's rows)
    if top >= vocab_size:
        return f"tokens.bin holds token id {top}, not below the tokenizer's vocabulary size {vocab_size}"
    return None


def _offsets_problem(blocks, offsets: np.ndarray, total: int) -> str | None:
    previous = 0
    for block in blocks:
        # offsets[d] >= offsets[d - 1], across the blocks' boundaries too
        if (np.diff(block, prepend=previous) < 0).any():
            return "offsets.bin decreases somewhere (a document would end before it starts)"
        previous = int(block[-1])
    # offsets[0] = 0 and offsets[D] = T
    if offsets[0] != 0 or offsets[-1] != total:
        return f"offsets.bin runs from {offsets[0]:,} to {offsets[-1]:,}; expected 0 to {total:,} (the tokens)"
    return None


def _prompts_problem(blocks, lengths: np.ndarray) -> str | None:
    start = 0
    for block in blocks:
        # 0 <= prompt_length[d] <= len(row d)
        if (block < 0).any() or (block > lengths[start:start + len(block)]).any():
            return "prompt_lengths.bin holds a prompt length outside 0..its row's length"
        start += len(block)
    return None


def verify_entry(entry: Shard, vocab_size: int) -> None:
    """Read each file once to check hashes, offsets, ids and prompt lengths; EntryProblem names the first failure."""
    m = entry.manifest
    checks = [("tokens.bin", np.dtype(m["dtype"]), lambda blocks: _ids_problem(blocks, vocab_size)),
              ("offsets.bin", np.int64, lambda blocks: _offsets_problem(blocks, entry.offsets, int(m["tokens"])))]
    if m["kind"] == "sft":
        checks.append(("prompt_lengths.bin", np.int64, lambda blocks: _prompts_problem(blocks, entry.lengths)))
    for name, dtype, check in checks:
        digest = new_digest()
        problem = check(_blocks(entry.path / name, dtype, digest))
        if problem is None and digest.hexdigest() != m["files"][name]["blake2b"]:
            problem = f"{name} does not match its hash in the manifest (it changed after it was written)"
        if problem is not None:
            raise EntryProblem(problem)


def tokenizer_hash(tokenizer) -> str:
    """Hash of tokenizer.json and the config files next to it (they decide ids and specials)."""
    file = Path(tokenizer.source)
    digest = new_digest()
    for part in [file] + [file.parent / name for name in CONFIG_FILES]:
        digest.update(part.name.encode() + b"\0" + (file_hash(part).encode() if part.is_file() else b"-"))
    return digest.hexdigest()


def _source_files(paths) -> list[dict]:  # what a source's identity records of each file
    return [{"path": str(p.resolve()), "size": p.stat().st_size, "blake2b": file_hash(p)} for p in paths]


def describe(source, kind: str, options: dict, tokenizer) -> dict:
    """What decides an entry's contents (kind, options, sources, tokenizer), and `key`, their hash."""
    if kind not in KINDS:
        raise UserError(f"shard kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
    identity = {"format_version": FORMAT_VERSION, "kind": kind, "options": dict(sorted(options.items())),
                "sources": _source_files(readers.resolve_sources(source)), "tokenizer": tokenizer_hash(tokenizer)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return {**identity, "key": key}


def write_entry(identity: dict, tokenizer, target: Path, *, progress: bool = False, label: str = "") -> Shard:
    """Tokenise into a temporary directory, manifest last, renamed to `target` (or theirs, if another won)."""
    tmp = files.temporary_directory(target)
    try:
        started, dtype = time.perf_counter(), token_dtype(tokenizer.vocab_size)
        counts = write_files(tmp, [Path(s["path"]) for s in identity["sources"]], identity["kind"],
                             identity["options"], tokenizer, dtype, progress=progress, label=label)
        for source in identity["sources"]:
            path = Path(source["path"])
            if (_source_files([path])[0] if path.is_file() else None) != source:
                raise UserError(f"{path} changed while it was being tokenised, so nothing was saved; "
                                "run again once it no longer changes")
        manifest = {**identity, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, **counts,
                    "seconds": round(time.perf_counter() - started, 3), "entry_id": uuid.uuid4().hex}
        files.write_json(tmp / MANIFEST, manifest, indent=1)
        try:
            os.rename(tmp, target)  # atomic; fails when target exists (another process won)
            files.fsync_dir(target.parent)
        except OSError:
            if read_entry(target) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        return load_entry(target)
    except EntryProblem as problem:
        raise UserError(f"{target} exists but is not a complete shard directory ({problem}); "
                        "remove it and run again") from None


def _find_or_write(identity: dict, folder: Path, tokenizer, *, damaged: str | None = None,
                   progress: bool = False, label: str = "") -> tuple[Shard, bool]:
    """Under the entry's lock: (`folder`'s entry, False) if complete, of this key, not `damaged`; else (new, True)."""
    with files.hold_lock(folder.parent / f".{folder.name}.lock", str(folder), wait=True):
        try:
            entry = load_entry(folder)
        except EntryProblem as problem:
            entry = None
            if folder.exists() and any(folder.iterdir()):  # not a new (or empty --out) directory
                print(f"{folder}: {problem}; tokenising {label} again", file=sys.stderr, flush=True)
        if (entry is not None and entry.manifest.get("key") == identity["key"]
                and (damaged is None or entry.manifest.get("entry_id") != damaged)):
            return entry, False
        if folder.exists():
            files.remove_tree(folder)
        return write_entry(identity, tokenizer, folder, progress=progress, label=label), True


def _check_out_folder(folder: Path, identity: dict, overwrite: bool) -> None:
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not (folder / MANIFEST).is_file():
        raise UserError(f"--out {folder} exists and is not a shard directory; choose a new or empty directory")
    if overwrite:
        return
    try:
        theirs = _read_manifest(folder)
    except EntryProblem as problem:
        raise UserError(f"--out {folder} holds token shards that cannot be read ({problem}); pass "
                        "--overwrite to replace them, or choose another directory") from None
    differ = [name for name in ("sources", "kind", "options", "tokenizer") if theirs.get(name) != identity[name]]
    if differ:
        raise UserError(f"--out {folder} holds token shards of other data (their {', '.join(differ)} differ "
                        "from this call's); pass --overwrite to replace them, or choose another directory")


def prepare(source, kind: str, options: dict, tokenizer, *, out=None, cache_dir=None, overwrite: bool = False,
            progress: bool = False, say=None) -> Shard:
    """The entry of one source at `out` or CACHE/<key>: reused when verified, else written (damaged: rebuilt)."""
    identity = describe(source, kind, options, tokenizer)
    folder = Path(out).expanduser() if out is not None else Path(cache_dir or default_cache_dir()) / identity["key"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    files.remove_temporaries(folder.parent)
    if out is not None:
        _check_out_folder(folder, identity, overwrite)
    label = readers.source_name(source)
    entry, written = _find_or_write(identity, folder, tokenizer, progress=progress, label=label)
    while not written:  # found, not written by this call: verified before use
        try:
            verify_entry(entry, tokenizer.vocab_size)
        except EntryProblem as problem:
            print(f"{folder}: {problem}; tokenising {label} again", file=sys.stderr, flush=True)
            entry, written = _find_or_write(identity, folder, tokenizer, damaged=entry.manifest["entry_id"],
                                            progress=progress, label=label)
            continue
        if say is not None:
            say(f"{label}: token shards found and verified, {folder}")
        return entry
    if say is not None:
        m = entry.manifest
        say(f"prepared {label}: {m['documents']:,} documents, {m['tokens']:,} tokens, "
            f"{m['skipped']:,} lines/rows skipped, {m['seconds']:.1f} s -> {folder}")
    return entry


def is_shard_dir(source) -> bool:
    return not str(source).startswith(readers.HF_PREFIX) and (Path(str(source)).expanduser() / MANIFEST).is_file()


def open_prepared(path, kind: str, options: dict, tokenizer) -> Shard:
    """A directory written by `prepare --out`, of this kind, options and tokenizer, verified; else UserError."""
    folder = Path(str(path)).expanduser()
    try:
        entry = load_entry(folder)
    except EntryProblem as problem:
        raise UserError(f"{folder} is not a complete shard directory ({problem}); prepare it again "
                        "with python -m minidiff.data.shards prepare") from None
    m = entry.manifest
    if m["kind"] != kind:
        raise UserError(f"{folder} holds {m['kind']} shards; this run needs {kind} shards")
    if m["options"] != dict(sorted(options.items())):
        raise UserError(f"{folder} was prepared with {m['options']}; this run reads sources with "
                        f"{dict(sorted(options.items()))}: prepare it again with the same options")
    if m["tokenizer"] != tokenizer_hash(tokenizer):
        raise UserError(f"{folder} was prepared with another tokenizer; prepare it again with {tokenizer.source}")
    try:
        verify_entry(entry, tokenizer.vocab_size)
    except EntryProblem as problem:
        raise UserError(f"{folder} failed verification: {problem}; prepare it again "
                        "with python -m minidiff.data.shards prepare") from None
    return entry


def open_source(source, kind: str, options: dict, tokenizer, *, cache_dir=None, progress: bool = False,
                say=None) -> Shard:
    """A source as a verified Shard: a prepared directory as is, anything else through the cache."""
    if is_shard_dir(source):
        return open_prepared(source, kind, options, tokenizer)
    return prepare(source, kind, options, tokenizer, cache_dir=cache_dir, progress=progress, say=say)


def cpt_options(text_field: str = "text", per_file: bool = False) -> dict:
    return {"field": text_field, "per": "file" if per_file else "line"}


def sft_options(fmt: str) -> dict:
    return {"format": fmt}


def parser() -> Parser:
    parser = Parser(prog="python -m minidiff.data.shards", description="Tokenise training sources once into "
                    "memory-mapped token shards (e.g. on a CPU machine before a GPU job); pass the --out directory "
                    "as --data of train_cpt.py / train_sft.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenise one training source into a shard directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json), the model's")
    p.add_argument("--data", required=True, nargs="+", help="files/directories forming ONE source (run once per "
                   "source to mix)")
    p.add_argument("--out", help="shard directory to write (default: the cache entry, printed)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of other data in --out")
    p.add_argument("--cache-dir", help=f"cache directory when no --out (default: {default_cache_dir()})")
    p.add_argument("--kind", choices=KINDS, default="cpt", help="cpt documents or sft rows (default: cpt)")
    p.add_argument("--text-field", default="text", help="CPT: column holding the text in row files")
    p.add_argument("--per-file", action="store_true", help="CPT: a whole .txt file is one document")
    p.add_argument("--format", choices=SFT_FORMATS, default="alpaca", help="SFT: row format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    options = cpt_options(args.text_field, args.per_file) if args.kind == "cpt" else sft_options(args.format)
    started = time.perf_counter()
    entry = prepare(args.data, args.kind, options, tok, out=args.out, cache_dir=args.cache_dir,
                    overwrite=args.overwrite, progress=not args.no_progress)
    m, seconds = entry.manifest, time.perf_counter() - started
    print(m["read_summary"], file=sys.stderr)
    print(f"{m['documents']:,} {'rows' if args.kind == 'sft' else 'documents'}, {m['tokens']:,} tokens "
          f"({m['dtype']}), {m['skipped']:,} lines/rows skipped; tokenised in {m['seconds']:.1f} s, "
          f"this call {seconds:.1f} s -> {entry.path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
