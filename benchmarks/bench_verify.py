"""What verifying a token shard costs per GB, against the reading it cannot beat.

References: none (a measurement of minidiff.data.shards.verify_entry).

    python benchmarks/bench_verify.py                 # a 0.75 GB uint32 tokens.bin (mmBERT's dtype)
    python benchmarks/bench_verify.py --gb 0.002      # smoke size
    python benchmarks/bench_verify.py --json verify.json   # the figures as JSON too

A synthetic entry is written to a temporary directory: random uint32 ids below mmBERT's
vocabulary size (256,000), documents of 1 to 1,000 tokens, the manifest with each file's size
and hash. Then, in this order, on the same files:
- raw read: `readinto` of tokens.bin into one reused buffer of shards.READ_CHUNK bytes, nothing
  else (the bound: what any reader of the file pays);
- file_hash: shards.file_hash(tokens.bin), BLAKE2b over the same reads;
- verify: shards.verify_entry (hash + largest id of tokens.bin, hash + order of offsets.bin),
  what every process does once per run before it uses an entry.
The file was just written, so every read comes from the page cache: these are CPU costs. A cold
read from disk is bounded by the disk instead (compare the raw read with the disk's speed).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from common import MMBERT_BASE, add_flags, banner, timed, use_threads, write_results

from minidiff.data import shards
from minidiff.errors import UserError, run_cli

VOCAB = MMBERT_BASE["vocab_size"]  # mmBERT-base's vocabulary: uint32 token ids


def write_synthetic_entry(folder: Path, tokens: int, seed: int = 0) -> None:
    """tokens.bin, offsets.bin and a manifest shards.load_entry accepts, written 64 MiB at a time."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with open(folder / "tokens.bin", "wb") as handle:
        for start in range(0, tokens, 16 * 2**20):
            rng.integers(0, VOCAB, min(16 * 2**20, tokens - start), dtype=np.uint32).tofile(handle)
    lengths = rng.integers(1, 1001, tokens // 500 + 1)  # [D'] more than enough documents
    ends = np.cumsum(lengths)
    ends = np.append(ends[ends < tokens], tokens)  # [D] the last document ends at the last token
    np.concatenate([[0], ends]).astype(np.int64).tofile(folder / "offsets.bin")
    files = {name: {"size": (folder / name).stat().st_size, "blake2b": shards.file_hash(folder / name)}
             for name in ("tokens.bin", "offsets.bin")}
    manifest = {"format_version": shards.FORMAT_VERSION, "kind": "cpt", "options": shards.cpt_options(),
                "sources": [], "tokenizer": "synthetic", "key": "synthetic", "dtype": "uint32",
                "vocab_size": VOCAB, "documents": len(ends), "tokens": tokens, "skipped": 0,
                "read_summary": "synthetic", "seconds": 0.0, "files": files, "entry_id": "synthetic"}
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))


def raw_read(path: Path) -> None:
    buffer = memoryview(bytearray(shards.READ_CHUNK))
    with open(path, "rb") as handle:
        while handle.readinto(buffer):
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.75, help="size of tokens.bin in GB (1e9 bytes)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per measurement; the best is kept")
    add_flags(parser)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    if not 0 < args.gb <= 8 or args.repeats < 1:
        raise UserError(f"--gb {args.gb} / --repeats {args.repeats}: expected 0 < GB <= 8 and at least one repeat")
    tokens = int(args.gb * 1e9) // 4
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as work:
        folder = Path(work) / "entry"
        write_synthetic_entry(folder, tokens)
        entry = shards.load_entry(folder)
        token_gb = (folder / "tokens.bin").stat().st_size / 1e9
        entry_gb = token_gb + (folder / "offsets.bin").stat().st_size / 1e9
        rows = [("raw read of tokens.bin (readinto)", token_gb, lambda: raw_read(folder / "tokens.bin")),
                ("shards.file_hash(tokens.bin)", token_gb, lambda: shards.file_hash(folder / "tokens.bin")),
                ("shards.verify_entry (tokens + offsets)", entry_gb, lambda: shards.verify_entry(entry, VOCAB))]
        print(f"bench_verify: tokens.bin {token_gb:.3f} GB ({tokens:,} uint32 ids), offsets.bin "
              f"{entry.num_documents + 1:,} int64, warm page cache, best of {args.repeats}\n{banner()}")
        print("| what | GB read | seconds | GB/s | seconds per GB |")
        print("|---|---|---|---|---|")
        results = []
        for name, gb, call in rows:
            seconds = min(timed(call)[1] for _ in range(args.repeats))
            results.append({"what": name, "gb": gb, "seconds": seconds})
            print(f"| {name} | {gb:.4g} | {seconds:.3f} | {gb / seconds:.2f} | {seconds / gb:.2f} |")
    write_results(args.json, {"tokens": tokens, "repeats": args.repeats, "rows": results})
    return 0


if __name__ == "__main__":
    run_cli(main)
