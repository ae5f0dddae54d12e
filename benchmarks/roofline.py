"""Roofline: each hot path's FLOPs and bytes, counted from the shapes it runs, against this machine.

References: the roofline model (Williams et al., CACM 2009); mmBERT (arXiv 2509.06888), LLaDA
(2502.09992), Fast-dLLM (2505.22618). Findings and the method: docs/benchmarks.md ("Roofline").

    python benchmarks/roofline.py --threads 1           # mmBERT-base shape on the CPU (3 minutes on 2 busy cores)
    python benchmarks/roofline.py --toy                 # a tiny shape (seconds)
    python benchmarks/roofline.py --device cuda --json gpu.json     # what gpu_check.sh runs
    python benchmarks/roofline.py --compare gpu.json    # adds that run's measured columns

Each hot path is counted op by op (TorchDispatchMode) in its first, untimed call, then timed
(median of --repeats); the machine's peak FLOP/s and read bandwidth are measured in the same run:
    bound = max(FLOPs / peak FLOP/s, bytes / read bandwidth)   (C: compute, M: memory bound)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from common import banner, machine, mmbert_base, parse, seconds, timed, tiny_shape, write_results
from torch.utils._python_dispatch import TorchDispatchMode

from minidiff.errors import UserError, run_cli
from minidiff.evaluation.answers import mc_loglik_many
from minidiff.lora import apply_lora, lora_modules
from minidiff.model import ModelConfig, ModernBertMLM, model_device
from minidiff.plumbing.device import check_available, inference_precision, resolve_device
from minidiff.speed.chunked_loss import linear_cross_entropy, nelbo_loss
from minidiff.speed.sampling import FastConfig, generate

H200 = {"name": "H200", "flops": 990e12, "bytes_per_s": 4.8e12}  # dense bf16, HBM3e


def storage_key(t: torch.Tensor) -> int:
    """Which memory a tensor reads: its storage, or itself for oneDNN's opaque (packed) tensors."""
    return id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's elements occupy: an expanded dimension (stride 0) is stored once."""
    if t.numel() == 0:
        return 0
    if t.is_mkldnn:
        return t.numel() * t.element_size()  # a packed weight: dense, no strides
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


def product_flops(name: str, args) -> int:
    """2 M K N per matrix product, 4 B h Sq Sk d per attention (8 in its backward)."""
    if name in ("aten.mm", "aten.bmm"):
        return 2 * args[0].numel() * args[1].shape[-1]  # [.., M, K] x [.., K, N]
    if name in ("aten.addmm", "aten.baddbmm"):
        return 2 * args[1].numel() * args[2].shape[-1]
    if name in ("mkldnn._linear_pointwise", "aten.linear"):
        return 2 * args[0].numel() * args[1].shape[0]  # x [.., K], W [N, K]
    if "scaled_dot_product" in name:
        q, k = (args[1], args[2]) if name.endswith("_backward") else (args[0], args[1])
        per_pass = 8 if name.endswith("_backward") else 4
        return per_pass * q.numel() * k.shape[-2]  # q [B, h, Sq, d], k [B, h, Sk, d]
    return 0


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)


class Counter(TorchDispatchMode):
    """FLOPs of the products (product_flops) and bytes of every op that runs inside it: each op's
    operands and results, views free (eager PyTorch's traffic)."""

    def __init__(self):
        super().__init__()
        self.flops = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if any(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view: no data moves
        inputs = list(_tensors(args)) + list(_tensors(list((kwargs or {}).values())))
        outputs = list(_tensors(out))
        storages = {storage_key(t) for t in inputs}
        if not any(r.alias_info is not None for r in returns) and outputs and all(
                storage_key(t) in storages for t in outputs):
            return out  # an unannotated view (_unsafe_view)
        seen = {}
        for t in inputs + outputs:  # an in-place op's operand and result are one tensor
            seen[(storage_key(t), 0 if t.is_mkldnn else t.storage_offset(), tuple(t.shape))] = tensor_bytes(t)
        self.bytes += sum(seen.values())
        self.flops += product_flops(str(func.overloadpacket), args)
        return out


def square_products(a: torch.Tensor, b: torch.Tensor) -> list[Callable]:
    """Every kernel this build offers for a @ b^T: aten's (MKL or cuBLAS), and on the CPU oneDNN's
    on b as stored and on b packed (minidiff/speed/packed.py). The machine's rate is the fastest."""
    products = [lambda: a @ b.T]
    if a.device.type == "cpu" and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b, a.shape[0])
        products += [lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""),
                     lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")]
    return products


def measure_machine(device: torch.device, n: int, read_bytes: int, repeats: int = 3) -> dict:
    """Peak matmul FLOP/s (fp32, bf16; n x n, the fastest kernel) and read bytes/s, best of `repeats` each."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for product in square_products(a, b):
            product()  # warm-up
            best = min(best, *seconds(product, device, repeats))
        # 2 n^3 FLOPs per n x n product
        rates[str(dtype).replace("torch.", "")] = 2 * n**3 / best
        del a, b
    data = torch.ones(read_bytes // 4, device=device)
    data.sum()
    bandwidth = read_bytes / min(seconds(data.sum, device, repeats))
    del data
    return {"matmul_flops_float32": rates["float32"], "matmul_flops_bfloat16": rates["bfloat16"],
            "read_bytes_per_s": bandwidth, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def bound(flops: float, nbytes: float, peak_flops: float, bytes_per_s: float) -> tuple[float, str]:
    """max(FLOPs / peak, bytes / bandwidth) in seconds, and which term it is (C or M)."""
    compute, memory = flops / peak_flops, nbytes / bytes_per_s
    return (compute, "C") if compute >= memory else (memory, "M")


@dataclass
class HotPath:
    name: str
    run: Callable[[], object]  # one call; its result may say how many steps it made
    steps: Callable[[object], int] = lambda result: 1  # per-call counts and times are divided by this


@dataclass
class Shapes:
    """The sizes each path runs at (mmBERT-base by default, small with --toy)."""
    mc_samples: int  # mc_loglik's samples, one batch
    decoder_rows: tuple = (1, 8, 32, 128, 512)
    layer_tokens: tuple = (32, 128, 512)
    prompt: int = 64  # the sampler's prompt: bench_sample.py's shape (prompt 64, blocks of 32)
    block: int = 32
    new_tokens: int = 32  # one block in `sampler_steps` steps: one cache refresh, then cached steps
    sampler_steps: int = 8
    score_prompt: int = 16  # mc_loglik's prompt and answer
    answer: int = 16
    loss_rows: int = 128
    train_batch: tuple = (1, 128)
    lora_rank: int = 256  # Diffutron's r (arXiv 2603.20466)


BASE_SHAPES = Shapes(mc_samples=8)
TOY_SHAPES = Shapes(mc_samples=8, layer_tokens=(8, 16, 32), prompt=8, block=8, new_tokens=16, sampler_steps=4,
                    score_prompt=8, answer=4, loss_rows=16, train_batch=(2, 16), lora_rank=8)


def hot_paths(config: ModelConfig, shapes: Shapes, device: torch.device, precision) -> list[HotPath]:
    """Every hot path as a call on random weights at these shapes; the last one applies LoRA
    to the model in place when it first runs (the paths run in this order)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = precision.prepare(ModernBertMLM(config)).eval()
        # the same layer shape, one (global) layer, a small vocabulary (only looked up)
        one_layer = {**config.to_dict(), "num_hidden_layers": 1, "layer_types": None, "vocab_size": 512}
        layer_model = precision.prepare(ModernBertMLM(ModelConfig.from_dict(one_layer))).eval()
    H, V, mask_id, eos_id = config.hidden_size, config.vocab_size, config.mask_token_id, config.eos_token_id
    ids = lambda *shape: torch.randint(5, V, shape, device=device)  # noqa: E731

    def inference(fn):
        def run():
            with torch.no_grad(), precision.autocast():
                return fn()
        return run

    paths = []
    for m in shapes.decoder_rows:
        x = torch.randn(m, H, device=device)
        paths.append(HotPath(f"decoder [{m}, {H}] x [{H}, {V}]", inference(lambda x=x: model.decoder(x))))
    for s in shapes.layer_tokens:
        tokens = torch.randint(5, 512, (1, s), device=device)
        paths.append(HotPath(f"encoder layer, {s} tokens", inference(lambda t=tokens: layer_model.hidden(t))))
    for batch in (1, 8):
        prompts = [ids(shapes.prompt).tolist() for _ in range(batch)]
        for cache in ("none", "prefix", "dual"):
            sampler = FastConfig(cache=cache, max_new_tokens=shapes.new_tokens, block_length=shapes.block,
                                 steps=shapes.sampler_steps, length_bucket=0)  # the step on its own canvas
            run = inference(lambda p=prompts, c=sampler: generate(model, p, c, mask_id=mask_id, eos_id=eos_id))
            paths.append(HotPath(f"sampler step, cache {cache}, batch {batch}", run, lambda out: out.num_forward))
    prompt, answer = ids(shapes.score_prompt), ids(shapes.answer)
    paths.append(HotPath(f"mc_loglik, {shapes.mc_samples} samples of {shapes.score_prompt} + {shapes.answer}",
                         inference(lambda: mc_loglik_many(model, [(prompt, answer)], mask_id, pad_id=mask_id,
                                                          num_samples=shapes.mc_samples,
                                                          batch_size=shapes.mc_samples))))
    paths.append(chunked_loss_path(model, shapes.loss_rows, mask_id, precision))
    paths.append(training_path(model, shapes, mask_id, precision))
    return paths


def chunked_loss_path(model, rows: int, mask_id: int, precision) -> HotPath:
    """linear_cross_entropy forward + backward at `rows` rows, the decoder frozen (as under LoRA)."""
    weight, bias = model.decoder.weight.detach(), model.decoder.bias.detach()
    device = weight.device
    features = torch.randn(rows, weight.shape[1], device=device, requires_grad=True)
    targets = torch.randint(5, weight.shape[0], (rows,), device=device)
    row_weights = torch.ones(rows, device=device)

    def run():
        with precision.autocast():
            loss, _ = linear_cross_entropy(features, weight, bias, targets, row_weights, excluded_column=mask_id)
        loss.backward()
    return HotPath(f"chunked loss, {rows} rows, fwd + bwd", run)


def training_path(model, shapes: Shapes, mask_id: int, precision) -> HotPath:
    """One LoRA CPT micro-batch: nelbo_loss at t = 0.5 (same masks every call), forward + backward.
    LoRA goes onto `model` (train mode) at the first call: the paths before it measure the plain model."""
    rank = shapes.lora_rank
    device = model_device(model)
    batch, seq = shapes.train_batch
    x0 = torch.randint(5, model.config.vocab_size, (batch, seq), device=device)
    t = torch.full((batch,), 0.5, device=device)

    def run():
        if not lora_modules(model):
            apply_lora(model, r=rank, alpha=rank, dropout=0.05)
            model.train()
        generator = torch.Generator(device=device).manual_seed(0)
        with precision.autocast():
            loss, _ = nelbo_loss(model, x0, mask_id, t=t, generator=generator)
        loss.backward()
    return HotPath(f"LoRA micro-batch {batch} x {seq} (r={rank}), fwd + bwd", run)


def measure(path: HotPath, device: torch.device, repeats: int) -> dict:
    """Counts from the first call (inside Counter), the median time of the next `repeats`."""
    with Counter() as counter:
        steps = path.steps(path.run())
    times = seconds(path.run, device, repeats)
    return {"name": path.name, "flops": counter.flops / steps, "bytes": counter.bytes / steps,
            "seconds": statistics.median(times) / steps, "steps": steps}


def add_bounds(row: dict, machine: dict, compute_dtype: torch.dtype) -> dict:
    peak = machine["matmul_flops_bfloat16" if compute_dtype == torch.bfloat16 else "matmul_flops_float32"]
    row["bound_seconds"], row["bound_kind"] = bound(row["flops"], row["bytes"], peak, machine["read_bytes_per_s"])
    row["h200_bound_seconds"], row["h200_bound_kind"] = bound(row["flops"], row["bytes"], H200["flops"],
                                                              H200["bytes_per_s"])
    return row


def read_compare(path: str | None) -> dict:
    """name -> row of another run's --json output (e.g. the GPU's), or {} without --compare."""
    if path is None:
        return {}
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))["paths"]
        return {row["name"]: row for row in rows if row["seconds"] > 0 and row["bound_seconds"] > 0}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--compare {path}: cannot read it as a roofline.py --json file ({err}); "
                        "expected the output of `roofline.py --json FILE`.") from None


def print_table(rows: list[dict], compare: dict, other: str) -> None:
    head = "| path | GFLOP | MB | ms | GFLOP/s | GB/s | bound ms | time / bound | H200 bound ms |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if compare:
        head, rule = head + f" {other} ms | {other} time / bound |", rule + "---|---|"
    print(head + "\n" + rule)
    for r in rows:
        t = r["seconds"]
        line = (f"| {r['name']} | {r['flops'] / 1e9:.3g} | {r['bytes'] / 1e6:.4g} | {1e3 * t:.3g} | "
                f"{r['flops'] / t / 1e9:.3g} | {r['bytes'] / t / 1e9:.3g} | "
                f"{1e3 * r['bound_seconds']:.3g} {r['bound_kind']} | {t / r['bound_seconds']:.2f} | "
                f"{1e3 * r['h200_bound_seconds']:.3g} {r['h200_bound_kind']} |")
        if compare:
            theirs = compare.get(r["name"])
            line += (f" {1e3 * theirs['seconds']:.3g} | {theirs['seconds'] / theirs['bound_seconds']:.2f} |"
                     if theirs else " - | - |")
        print(line)


def model_config(args) -> ModelConfig:
    if args.config is None:
        return tiny_shape() if args.toy else mmbert_base()
    try:
        config = ModelConfig.from_json(args.config)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"--config {args.config}: cannot read it as a model config.json ({err}).") from None
    if config.mask_token_id is None:
        config.mask_token_id = config.vocab_size - 1  # any id does for random weights
    return config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="a tiny shape (hidden 64, 2 layers, vocabulary 1000)")
    p.add_argument("--config", default=None, help="a config.json to take the shape from (default: mmBERT-base)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (cuda: bf16 autocast; cpu: bf16 with avx512_bf16 "
                   "or amx_bf16, else fp32), float32, bfloat16")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per path after the counted one (median)")
    p.add_argument("--compare", default=None, help="another run's --json (e.g. the GPU's): its measured columns")
    p.add_argument("--no-packed-weights", action="store_true",
                   help="the model's linears multiply with their weights as stored (as sample.py --no-packed-weights)")
    args = parse(p, argv)  # --json: the machine, counts and times (what --compare reads)
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}.")
    config = model_config(args)
    compare = read_compare(args.compare)
    device = resolve_device(args.device)
    check_available(device)
    precision = inference_precision(args.dtype, device, pack=not args.no_packed_weights)
    compute_dtype = precision.autocast_dtype or precision.weights
    side, read_bytes = (256, 2**25) if args.toy else (8192, 2**32) if device.type == "cuda" else (2048, 2**30)
    machine_rates = measure_machine(device, side, read_bytes)
    shapes = TOY_SHAPES if args.toy else BASE_SHAPES
    rows = []
    for path in hot_paths(config, shapes, device, precision):
        row, elapsed = timed(lambda: add_bounds(measure(path, device, args.repeats), machine_rates, compute_dtype))
        rows.append(row)
        print(f"{path.name}: {elapsed:.1f} s", file=sys.stderr, flush=True)
    print(f"\nroofline: {precision.describe()}; hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"vocabulary {config.vocab_size}; matmul {machine_rates['matmul_flops_float32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{machine_rates['matmul_flops_bfloat16'] / 1e9:.0f} bf16; read "
          f"{machine_rates['read_bytes_per_s'] / 1e9:.1f} GB/s; median of {args.repeats}\n{banner(device)}\n")
    print_table(rows, compare, Path(args.compare).stem if compare else "")
    write_results(args.json, {"machine": {**machine(device), **machine_rates}, "precision": precision.describe(),
                              "config": config.to_dict(), "h200": H200, "paths": rows})
    return 0


if __name__ == "__main__":
    run_cli(main)
