"""What every benchmark shares: the timer, the machine banner, threads, --json, mmBERT-base's shape
and markdown table heads. The scripts import it as a sibling (`from common import ...`).

References: mmBERT (arXiv 2509.06888) for the shape; docs/benchmarks.md for what the benchmarks found.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from minidiff.model import ModelConfig
from minidiff.plumbing.device import NATIVE_BF16_FLAGS, cpu_flags
from minidiff.plumbing.files import write_json

# mmBERT-base: 22 layers, hidden 768, 12 heads, MLP 1152, window 128 with a global layer every 3,
# vocabulary 256,000 (Gemma's special ids: pad 0, eos 1, bos 2, mask 4)
MMBERT_BASE = dict(vocab_size=256000, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                   num_attention_heads=12, max_position_embeddings=8192, global_rope_theta=160000.0,
                   local_rope_theta=160000.0, local_attention=128, global_attn_every_n_layers=3, pad_token_id=0,
                   eos_token_id=1, bos_token_id=2, cls_token_id=1, sep_token_id=1, mask_token_id=4)
# the tiny shape of the smoke runs: hidden 64, 2 layers, vocabulary 1000
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            local_attention=16)


def mmbert_base(**changes) -> ModelConfig:
    """mmBERT-base's shape with the given fields changed (the layer pattern follows the depth)."""
    return ModelConfig(**{**MMBERT_BASE, **changes})


def tiny_shape(**changes) -> ModelConfig:
    """The tiny shape (TINY) with the given fields changed."""
    return mmbert_base(**{**TINY, **changes})


def synchronize(device) -> None:
    """Wait for a CUDA device's queue (nothing on the CPU or without a device)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device=None):
    """(fn(), its wall seconds), a CUDA device's queue drained before and after (the work's time, not its launch's)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def seconds(fn: Callable, device, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls (the device's queue drained around each)."""
    return [timed(fn, device)[1] for _ in range(repeats)]


def add_flags(parser: argparse.ArgumentParser, *, threads: int = 0,
              threads_help: str = "torch threads (0: torch's default)") -> None:
    """--threads and --json PATH, the same in every benchmark."""
    parser.add_argument("--threads", type=int, default=threads, help=f"{threads_help} (default {threads})")
    parser.add_argument("--json", metavar="PATH", help="also write the results (and the machine) here as JSON")


def use_threads(threads: int) -> None:
    """torch's intra-op threads; 0 leaves torch's default."""
    if threads:
        torch.set_num_threads(threads)


def parse(parser: argparse.ArgumentParser, argv=None, **flags) -> argparse.Namespace:
    """The flags parsed, --threads and --json added first (add_flags), torch's threads set."""
    add_flags(parser, **flags)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    return args


def interleaved(runs: dict[str, Callable], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """name -> seconds per round, each run once a round (A, B, A, B, ...); the first `warmup` rounds dropped."""
    times = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            elapsed = timed(run)[1]
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def table_head(*columns: str, right: int = 0) -> str:
    """A markdown table's header and rule, the last `right` columns aligned right."""
    rule = ["---"] * (len(columns) - right) + ["---:"] * right
    return f"| {' | '.join(columns)} |\n|{'|'.join(rule)}|"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        names = [line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine(device=None) -> dict:
    """The machine: CPU, native bf16 flags, CPUs, torch threads, load average, versions, date (on CUDA the GPU)."""
    info = {"cpu": cpu_model(), "native_bf16": [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()],
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if device is not None and torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def banner(device=None) -> str:
    """One line about the machine, printed above every table."""
    m = machine(device)
    gpu = f"{m['gpu']} (CUDA {m['cuda']}); " if "gpu" in m else ""
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    return (f"machine: {gpu}{m['cpu']} ({', '.join(m['native_bf16']) or 'no native bf16'}), {m['cpus']} CPUs, "
            f"{m['threads']} threads, load average {load}; torch {m['torch']}, python {m['python']}, "
            f"numpy {m['numpy']}; {m['date']}")


def write_results(path: str | None, results: dict, device=None) -> None:
    """`results` as JSON at `path` (nothing without --json), with the machine unless they hold one."""
    if path:
        write_json(path, {"machine": machine(device), **results})
