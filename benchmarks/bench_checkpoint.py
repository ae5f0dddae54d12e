"""What a verified checkpoint costs: save and verification time per GB, beside the disk's bounds.

References: none (plumbing); the format is minidiff/training/state.py's. Findings:
docs/benchmarks.md ("Verification: checkpoints and token shards").

    python benchmarks/bench_checkpoint.py                  # 54.1M trainable parameters (mmBERT-base, LoRA r=256)
    python benchmarks/bench_checkpoint.py --params 100000  # smoke size
    python benchmarks/bench_checkpoint.py --json checkpoint.json  # the figures as JSON too

Bounds, measured in the same run: the same bytes written with one tofile + fsync, and BLAKE2b over them.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import MMBERT_BASE, banner, parse, seconds, table_head, write_results

from minidiff import optim
from minidiff.plumbing import files
from minidiff.training import state as train_state

# LoRA r=256 on one mmBERT-base layer: (in, out) of Wqkv, Wo, Wi, the MLP's Wo
HIDDEN, MLP = MMBERT_BASE["hidden_size"], MMBERT_BASE["intermediate_size"]
LAYER_SHAPES = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 2 * MLP), (MLP, HIDDEN)]


def lora_model(params: int, r: int = 256) -> torch.nn.Module:
    """A module holding about `params` trainable fp32 parameters, in LoRA-shaped matrices."""
    tensors, total = [], 0
    while total < params:
        for fan_in, fan_out in LAYER_SHAPES:
            rank = min(r, max(1, (params - total) // (fan_in + fan_out)))
            tensors += [torch.nn.Parameter(torch.randn(rank, fan_in)), torch.nn.Parameter(torch.zeros(fan_out, rank))]
            total += rank * (fan_in + fan_out)
            if total >= params:
                break
    return torch.nn.ParameterList(tensors)


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(seconds(fn, None, repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=54_067_200, help="trainable parameters (default: LoRA r=256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = parse(p, argv)
    model = lora_model(args.params)
    for q in model:
        q.grad = torch.randn_like(q)
    optimizer = optim.AdamW(list(model), lr=1e-4)
    optimizer.step()  # fills both moments
    lr_schedule = optim.WarmupCosine(optimizer, warmup=0, total=10)
    generator = torch.Generator().manual_seed(0)
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-checkpoint-"))
    try:
        step = [0]

        def save():
            step[0] += 1
            tmp = train_state.begin_checkpoint(work, step[0])
            train_state.write_rng(tmp, 0, generator)
            train_state.finish_checkpoint(tmp, step[0], model, optimizer, lr_schedule, {"data": {}}, keep_last=1)

        save_s = median_seconds(save, args.repeats)
        path = train_state.latest_checkpoint(work)
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        verify_s = median_seconds(lambda: train_state.verify_checkpoint(path), args.repeats)
        assert train_state.verify_checkpoint(path) is None
        raw = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
        plain = work / "plain.bin"

        def write_plain():
            with open(plain, "wb") as handle:
                raw.tofile(handle)
                handle.flush()
                os.fsync(handle.fileno())

        write_s = median_seconds(write_plain, args.repeats)
        hash_s = median_seconds(lambda: files.file_hash(plain), args.repeats)
        hashlib_s = median_seconds(lambda: hashlib.blake2b(raw.data, digest_size=20).hexdigest(), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gb = nbytes / 1e9
    rows = [{"what": name, "seconds": s, "seconds_per_gb": s / gb, "gb_per_s": gb / s}
            for name, s in [("save a verified checkpoint", save_s), ("verify it (resume's check)", verify_s),
                                  ("bound: write the same bytes + fsync", write_s),
                                  ("bound: BLAKE2b of the file", hash_s), ("bound: BLAKE2b in memory", hashlib_s)]]
    print(f"# {args.params:,} trainable parameters, checkpoint {nbytes / 1e6:.1f} MB, median of {args.repeats}")
    print(f"# {banner()}")
    print(table_head("what", "s", "s per GB", "GB/s", right=3))
    for row in rows:
        print(f"| {row['what']} | {row['seconds']:.3f} | {row['seconds_per_gb']:.2f} | {row['gb_per_s']:.2f} |")
    write_results(args.json, {"params": args.params, "checkpoint_bytes": nbytes, "repeats": args.repeats,
                              "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
