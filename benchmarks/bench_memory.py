"""Peak memory and step time of one LoRA CPT micro-batch: dense vocabulary logits vs the
chunked linear + cross-entropy (minidiff.speed.chunked_loss), each measured in a fresh process.

References: Liger-Kernel's fused linear cross-entropy (arXiv 2410.10989), Cut Cross-Entropy
(2411.09009). Findings and the method: docs/benchmarks.md ("Vocabulary-loss memory").

    python benchmarks/bench_memory.py                      # hidden 768, vocab 256000, 2 layers, r=256
    python benchmarks/bench_memory.py --layers 4 --paths chunked
    python benchmarks/bench_memory.py --json memory.json   # the tables as JSON too

Each (path, batch) runs in its own process: the growth is ru_maxrss after one step minus the
resident size once the model is built; per masked token, the slope between the two batch sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import MMBERT_BASE, banner, interleaved, mmbert_base, parse, table_head, write_results

from minidiff import diffusion, lora
from minidiff.model import ModernBertMLM
from minidiff.speed import chunked_loss as chunked_module

MASK_ID = MMBERT_BASE["mask_token_id"]


def rss_mib() -> float:
    """Resident memory now (Linux /proc/self/statm), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Set the peak to the current resident size (Linux >= 4.0: clear_refs 5), so the model's
    construction (temporary [V, H] tensors) does not hide the step's peak. False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return peak_rss_mib() <= rss_mib() + 16


def build(args):
    config = mmbert_base(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads)
    torch.manual_seed(0)
    model = ModernBertMLM(config)
    lora.apply_lora(model, r=args.rank, alpha=args.rank, dropout=0.05, targets=("Wqkv", "Wo", "Wi"))
    return model.train()


def dense_loss(model, x0, t, generator):
    """The unchunked NELBO (normalize="sequence", linear schedule): logits [N, V] at the masked rows."""
    maskable = torch.ones_like(x0, dtype=torch.bool)
    xt, is_masked = diffusion.corrupt(x0, t, MASK_ID, maskable, generator, diffusion.get_schedule("linear"))
    logits = model(xt, logits_at=is_masked)  # [N, V]
    logits = logits.masked_fill(torch.arange(logits.shape[-1]) == MASK_ID, float("-inf"))
    ce = F.cross_entropy(logits, x0[is_masked], reduction="none")  # [N]
    rows = is_masked.nonzero()[:, 0]
    # mean_b [ sum_{i masked in row b} CE_i / t_b / S ]
    per_row = torch.zeros(x0.shape[0]).index_add_(0, rows, ce / t[rows])
    return (per_row / x0.shape[1]).mean(), is_masked.sum()


def chunked_loss(model, x0, t, generator):
    return chunked_module.nelbo_loss(model, x0, MASK_ID, t=t, generator=generator)


def step(model, loss_fn, x0, t) -> tuple[float, int]:
    """One forward + backward: (loss, masked tokens)."""
    model.zero_grad(set_to_none=True)
    loss, masked = loss_fn(model, x0, t, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.item(), int(masked)


def worker(args) -> None:
    """--worker dense|chunked: one step's peak memory; --worker time: both paths' step times. One JSON line."""
    chunked_module.LOGITS_BUDGET_BYTES = int(args.budget_mib * 2**20)
    model = build(args)
    x0 = torch.randint(5, args.vocab, (args.worker_batch, args.seq), generator=torch.Generator().manual_seed(2))
    t = torch.full((args.worker_batch,), args.t)
    if args.worker == "time":
        times = interleaved({name: lambda loss_fn=loss_fn: step(model, loss_fn, x0, t)
                             for name, loss_fn in (("dense", dense_loss), ("chunked", chunked_loss))}, args.repeats)
        print(json.dumps({name: statistics.median(v) for name, v in times.items()}))
        return
    reset = reset_peak_rss()
    base_rss = rss_mib()
    loss, masked = step(model, dense_loss if args.worker == "dense" else chunked_loss, x0, t)
    print(json.dumps({"path": args.worker, "batch": args.worker_batch, "masked": masked,
                      "growth_mib": peak_rss_mib() - base_rss, "peak_reset": reset, "loss": loss}))


def saved_activations_kib(args, layers: int, batch: int, autocast: bool, checkpointing: bool) -> float:
    """KiB of activations autograd saves for backward in the encoder (parameters excluded),
    counted by storage through saved_tensors_hooks, for a [batch, seq] input."""
    model = build(argparse.Namespace(**{**vars(args), "layers": layers, "vocab": 1000}))
    model.model.gradient_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(5, 1000, (batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.hidden(ids)
    return sum(saved.values()) / 1024


def activations_table(args) -> dict:
    """Saved activations per token per layer: the slope over layers (1 -> 4) and batch (1 -> 3),
    so weight casts and [S, S] masks, which do not grow with the tokens, cancel."""
    print(f"encoder activations saved for backward, hidden {args.hidden}, LoRA r={args.rank}, "
          f"sequence {args.seq} (autograd saved_tensors_hooks)\n{banner()}\n")
    print(table_head("precision", "gradient checkpointing", "KiB per token per layer", right=1))
    tokens = 2 * args.seq
    rows = []
    for autocast, checkpointing in ((False, False), (True, False), (True, True)):
        grow = [saved_activations_kib(args, layers, 3, autocast, checkpointing)
                - saved_activations_kib(args, layers, 1, autocast, checkpointing) for layers in (1, 4)]
        per = (grow[1] - grow[0]) / 3 / tokens
        rows.append({"precision": "bf16 autocast" if autocast else "fp32", "checkpointing": checkpointing,
                     "kib_per_token_per_layer": per})
        print(f"| {rows[-1]['precision']} | {'yes' if checkpointing else 'no'} | {per:.3f} |")
    return {"activations": rows}


def measure(args, path: str, batch: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--worker-batch", str(batch)]
    for name in ("vocab", "hidden", "intermediate", "heads", "layers", "rank", "seq", "t", "repeats", "threads",
                 "budget_mib"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: the {path} measurement at batch {batch} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=MMBERT_BASE["vocab_size"])
    p.add_argument("--hidden", type=int, default=MMBERT_BASE["hidden_size"])
    p.add_argument("--intermediate", type=int, default=MMBERT_BASE["intermediate_size"])
    p.add_argument("--heads", type=int, default=MMBERT_BASE["num_attention_heads"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batches", type=int, nargs=2, default=[4, 8], help="the two batch sizes of the slope")
    p.add_argument("--t", type=float, default=0.5, help="diffusion time: the fraction of tokens masked")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds (dense then chunked) at the larger batch after a warm-up; 0: no timing")
    p.add_argument("--budget-mib", type=float, default=256.0, help="chunked loss: logits memory per chunk")
    p.add_argument("--paths", nargs="+", choices=["dense", "chunked"], default=["dense", "chunked"])
    p.add_argument("--activations", action="store_true",
                   help="only count the encoder's saved activations per token per layer (seconds)")
    p.add_argument("--worker", choices=["dense", "chunked", "time"], help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    args = parse(p, threads=1)
    if not 0.0 < args.t <= 1.0 or args.batches[0] >= args.batches[1]:
        p.error(f"--t must lie in (0, 1] and --batches must be increasing; got {args.t} and {args.batches}")
    if args.worker:
        return worker(args)
    if args.activations:
        return write_results(args.json, activations_table(args))

    results = {path: [measure(args, path, b) for b in args.batches] for path in args.paths}
    if len(args.paths) == 2:
        for a, b in zip(results["dense"], results["chunked"]):
            rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
            assert a["masked"] == b["masked"] and rel < 1e-4, f"the two paths disagree: {a} vs {b}"
    timing = measure(args, "time", args.batches[1]) if args.repeats > 0 and len(args.paths) == 2 else None
    memory = [{**r, "slope_mib_per_masked_token": (large["growth_mib"] - small["growth_mib"])
               / (large["masked"] - small["masked"])} for small, large in results.values() for r in (small, large)]
    print_tables(args, memory, timing)
    write_results(args.json, {"settings": {k: getattr(args, k) for k in (
        "vocab", "hidden", "intermediate", "heads", "layers", "rank", "seq", "batches", "t", "threads", "budget_mib")},
        "memory": memory, "step_seconds": timing})


def print_tables(args, memory: list[dict], timing: dict | None) -> None:
    print(f"LoRA CPT micro-batch, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab:,}, r={args.rank}, "
          f"batches {args.batches[0]} and {args.batches[1]} x {args.seq} at t = {args.t}, fp32 CPU, "
          f"{args.threads} thread(s), chunk budget {args.budget_mib:g} MiB\n{banner()}\n")
    print(table_head("loss", "masked tokens", "peak growth (MiB)", "MiB per masked token (slope)", right=3))
    for r in memory:
        flag = "" if r["peak_reset"] else " (peak not resettable: includes model construction)"
        print(f"| {r['path']} | {r['masked']:,} | {r['growth_mib']:,.0f}{flag} | "
              f"{r['slope_mib_per_masked_token']:.3f} |")
    if timing:
        print(f"\nstep time (forward + backward), batch {args.batches[1]}, median of {args.repeats} "
              f"alternating rounds in one process after a warm-up:\n")
        print(table_head("loss", "s / step", "speed vs dense", right=2))
        for path in ("dense", "chunked"):
            print(f"| {path} | {timing[path]:.2f} | {timing['dense'] / timing[path]:.2f}x |")


if __name__ == "__main__":
    main()
