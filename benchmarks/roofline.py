"""Roofline: each hot path's FLOPs and bytes, counted from the shapes it runs, against this machine.

References: the roofline model (Williams, Waterman and Patterson, CACM 2009); ModernBERT
(arXiv 2412.13663) and mmBERT (2509.06888) for the default shape; LLaDA (2502.09992) and
Fast-dLLM (2505.22618) for the sampler step. Findings: docs/benchmarks.md ("Roofline").

    python benchmarks/roofline.py --threads 1           # mmBERT-base shape on the CPU (3 minutes on 2 busy cores)
    python benchmarks/roofline.py --toy                 # a tiny shape (seconds)
    python benchmarks/roofline.py --json cpu.json --plot roofline.png
    python benchmarks/roofline.py --device cuda --json gpu.json     # what gpu_check.sh runs
    python benchmarks/roofline.py --compare gpu.json    # adds that run's measured columns
    python benchmarks/roofline.py --products            # small-row product formulations (minidiff/speed/packed.py)

The machine, measured in the same run: the rate of a large square matmul in fp32 and bf16 (the
fastest of the kernels this build has: aten's, and on the CPU oneDNN's on a plain and on a packed
weight), the read bandwidth (a sum over a tensor far larger than the caches), the thread count.
The model's linears hold packed weights on the CPU, as in sample.py and evaluate.py
(`--no-packed-weights`: as stored).
The hot paths: the decoder (vocabulary projection) at M rows; one encoder layer on a sequence of
M tokens; one sampler step (`generate` with each cache, time / num_forward); a LoRA training
micro-batch, forward + backward; the chunked vocabulary loss; a Monte-Carlo scoring batch.
Counting, in each path's first (untimed) run, every op it dispatches (TorchDispatchMode):
    FLOPs = 2 M K N per matrix product (mm, addmm, bmm, baddbmm, oneDNN linear)
            + 4 B h Sq Sk d per attention (q k^T and the weighted sum of v; backward twice that)
    bytes = every op's operands and results (views cost nothing): eager PyTorch's traffic if no
            cache kept anything between ops
    bound = max(FLOPs / peak FLOP/s, bytes / read bandwidth)   (C: compute, M: memory bound)
with the peak of the dtype the path computes in; the H200 column applies the same counts to
4.8 TB/s and 990 dense bf16 TFLOP/s. Times are medians of --repeats calls after the counted one.
--products instead times each small-row product (decoder, layers) by several formulations.
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
import torch.nn.functional as F
from common import add_flags, banner, machine, mmbert_base, timed, tiny_shape, use_threads, write_results
from torch.utils._python_dispatch import TorchDispatchMode

from minidiff.errors import UserError, run_cli
from minidiff.evaluation.answers import mc_loglik_many
from minidiff.lora import apply_lora, lora_modules
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing.device import check_available, inference_precision, resolve_device
from minidiff.plumbing.files import atomic_path
from minidiff.sampler import SamplerConfig
from minidiff.speed.chunked_loss import linear_cross_entropy, nelbo_loss
from minidiff.speed.packed import PACK_ROWS
from minidiff.speed.sampling import generate

H200 = {"name": "H200", "flops": 990e12, "bytes_per_s": 4.8e12}  # dense bf16, HBM3e


# ----------------------------------------------------------------------------- counting


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
    """FLOPs of the products and bytes of every op that runs inside it (see the module docstring)."""

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


# ----------------------------------------------------------------------------- the machine


def seconds(fn: Callable, device: torch.device, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls (the device's queue drained around each)."""
    return [timed(fn, device)[1] for _ in range(repeats)]


def machine_sizes(device: torch.device, toy: bool) -> tuple[int, int]:
    """The square matmul's side and the bytes read for measure_machine."""
    if toy:
        return 256, 2**25
    return (8192, 2**32) if device.type == "cuda" else (2048, 2**30)


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
    """Peak matmul FLOP/s (fp32, bf16; n x n, the fastest kernel) and read bytes/s: the best of
    `repeats` runs each."""
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


# ----------------------------------------------------------------------------- the hot paths


@dataclass
class HotPath:
    name: str
    run: Callable[[], object]  # one call; its result may say how many steps it made
    steps: Callable[[object], int] = lambda result: 1  # per-call counts and times are divided by this


@dataclass
class Shapes:
    """The sizes each path runs at (mmBERT-base by default, small with --toy)."""

    decoder_rows: tuple = (1, 8, 32, 128, 512)
    layer_tokens: tuple = (32, 128, 512)
    prompt: int = 64  # the sampler's prompt: bench_sample.py's shape (prompt 64, blocks of 32)
    block: int = 32
    new_tokens: int = 32  # one block in `sampler_steps` steps: one cache refresh, then cached steps
    sampler_steps: int = 8
    score_prompt: int = 16  # mc_loglik's prompt and answer
    answer: int = 16
    mc_samples: int = 8
    loss_rows: int = 128
    train_batch: tuple = (1, 128)
    lora_rank: int = 256  # Diffutron's r (arXiv 2603.20466)


TOY_SHAPES = Shapes(layer_tokens=(8, 16, 32), prompt=8, block=8, new_tokens=16, sampler_steps=4, score_prompt=8, answer=4,
                    loss_rows=16, train_batch=(2, 16), lora_rank=8)


def one_layer_config(config: ModelConfig) -> ModelConfig:
    """The same layer shape with one (global) layer and a small vocabulary (only looked up)."""
    return ModelConfig.from_dict({**config.to_dict(), "num_hidden_layers": 1, "layer_types": None,
                                  "vocab_size": 512})


def hot_paths(config: ModelConfig, shapes: Shapes, device: torch.device, precision) -> list[HotPath]:
    """Every hot path as a call on random weights at these shapes; the last one applies LoRA
    to the model in place when it first runs (the paths run in this order)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = precision.prepare(ModernBertMLM(config)).eval()
        layer_model = precision.prepare(ModernBertMLM(one_layer_config(config))).eval()
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
            sampler = SamplerConfig(cache=cache, max_new_tokens=shapes.new_tokens, block_length=shapes.block,
                                    steps=shapes.sampler_steps)
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
    LoRA goes onto `model` (in train mode) at the first call, so every path before it measures
    the plain model in eval mode."""
    rank = shapes.lora_rank
    device = next(model.parameters()).device
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


# ----------------------------------------------------------------------------- measuring


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


# ----------------------------------------------------------------------------- output


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


def pyplot():
    """matplotlib.pyplot without a display, or the one sentence saying it is missing."""
    try:  # optional extra: only --plot needs it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed; install it or leave out --plot.") from None
    return plt


def plot(plt, rows: list[dict], machine: dict, path: str) -> None:
    """Achieved FLOP/s against FLOPs per byte, under the machine's roofs (fp32 and bf16)."""
    bandwidth = machine["read_bytes_per_s"]
    intensity = [r["flops"] / r["bytes"] for r in rows if r["bytes"] > 0]
    grid = [10 ** (k / 20) for k in range(-40, 80)]
    fig, ax = plt.subplots(figsize=(9, 6))
    for key, style in (("matmul_flops_float32", "-"), ("matmul_flops_bfloat16", "--")):
        # roof(I) = min(peak, I * bandwidth)
        ax.plot(grid, [min(machine[key], i * bandwidth) / 1e9 for i in grid], "k" + style,
                label=f"roof, {key.rsplit('_', 1)[1]} ({machine[key] / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.0f} GB/s)")
    for r, i in zip([r for r in rows if r["bytes"] > 0], intensity):
        ax.plot(i, r["flops"] / r["seconds"] / 1e9, "o")
        ax.annotate(r["name"], (i, r["flops"] / r["seconds"] / 1e9), fontsize=6)
    ax.set(xscale="log", yscale="log", xlabel="FLOPs per byte", ylabel="GFLOP/s",
           title=f"roofline, {machine['device']}, {machine['threads']} threads")
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- --products


def _vocabulary_chunks(x, weight, chunk: int = 8192):
    """(W_c x^T)^T for chunks of 8192 weight rows (a chunk's W_c [8192, K] stays in the L2/L3 cache)."""
    out = torch.empty(weight.shape[0], x.shape[0])  # [N, M]
    for start in range(0, weight.shape[0], chunk):
        torch.mm(weight[start:start + chunk], x.t(), out=out[start:start + chunk])
    return out.t()


def product_candidates(rows: int) -> dict:
    """name -> (prepare(W) -> what the product reads, product(x, prepared) -> [M, N], dtype)."""
    mkldnn = torch.ops.mkldnn
    same = lambda w: w  # noqa: E731
    candidates = {
        "F.linear (MKL sgemm)": (same, lambda x, w: F.linear(x, w), torch.float32),
        "(W @ x^T)^T": (same, lambda x, w: (w @ x.t()).t(), torch.float32),
        "x @ W^T stored [K, N]": (lambda w: w.t().contiguous(), lambda x, wt: x @ wt, torch.float32),
        "(W_c @ x^T)^T, 8192-row chunks": (same, _vocabulary_chunks, torch.float32),
        "oneDNN, plain W (minidiff.speed.packed at M > 1)": (
            same, lambda x, w: mkldnn._linear_pointwise(x, w, None, "none", [], ""), torch.float32),
        "oneDNN, W prepacked for M": (lambda w: mkldnn._reorder_linear_weight(w, rows),
                                      lambda x, p: mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                                      torch.float32),
        "oneDNN, W packed for 32 rows (pack_weights)": (
            lambda w: mkldnn._reorder_linear_weight(w, PACK_ROWS),
            lambda x, p: mkldnn._linear_pointwise(x, p, None, "none", [], ""), torch.float32),
        "bf16 F.linear (oneDNN)": (lambda w: w.bfloat16(), lambda x, w: F.linear(x.bfloat16(), w), torch.bfloat16),
        "bf16, W packed for 32 rows (pack_weights)": (
            lambda w: mkldnn._reorder_linear_weight(w.bfloat16(), PACK_ROWS),
            lambda x, p: mkldnn._linear_pointwise(x.bfloat16(), p, None, "none", [], ""), torch.bfloat16),
    }
    if torch.backends.mkl.is_available():
        candidates["MKL packed W (cblas_sgemm_pack)"] = (
            lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w),
            lambda x, p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, rows), torch.float32)
    return candidates


def time_products(runs: dict, dtypes: dict, shape: tuple, repeats: int, toy: bool) -> tuple[dict, dict]:
    """Seconds and time / bound of each run, in `repeats` interleaved rounds, each round's bound
    from a fresh (quick) measure_machine; shape = (M, K, N, copies of W)."""
    m, K, N, copies = shape
    times, ratios = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(repeats):
        machine = measure_machine(torch.device("cpu"), *((256, 2**25) if toy else (1024, 2**28)), repeats=2)
        for name, run in runs.items():
            dtype = dtypes[name]
            peak = machine["matmul_flops_" + str(dtype).replace("torch.", "")]
            # 2 M K N FLOPs; read W, x and write y, in the product's dtype
            limit, _ = bound(2 * m * K * N * copies, copies * (N * K + m * N + m * K) * dtype.itemsize, peak,
                             machine["read_bytes_per_s"])
            t = seconds(run, torch.device("cpu"), 1)[0]
            times[name].append(t)
            ratios[name].append(t / limit)
    return times, ratios


def compare_products(config: ModelConfig, repeats: int, toy: bool) -> None:
    """Each small-row product of the model (the decoder; each layer's four, over all layers so
    the weights come from memory as in a forward) by every candidate formulation: median ms and
    median time / bound, the bound re-measured in each interleaved round."""
    H, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    products = {f"decoder [M, {H}] x [{H}, {V}]": (V, H, 1), f"Wqkv [M, {H}] x [{H}, {3 * H}], x{L}": (3 * H, H, L),
                f"attention Wo [M, {H}] x [{H}, {H}], x{L}": (H, H, L),
                f"Wi [M, {H}] x [{H}, {2 * I}], x{L}": (2 * I, H, L), f"MLP Wo [M, {I}] x [{I}, {H}], x{L}": (H, I, L)}
    print(f"\nsmall-row products, fp32 unless named, {torch.get_num_threads()} threads; "
          f"ms (time / bound), median of {repeats} interleaved rounds; error: max |y - y64| / max |y64|")
    for title, (N, K, copies) in products.items():
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(N, K, generator=g) * 0.02 for _ in range(copies)]
        cells, errors = {}, {}
        for m in (1, 8, 32):
            x = torch.randn(m, K, generator=g)
            want = F.linear(x.double(), weights[0].double())  # [M, N] float64 reference
            candidates = product_candidates(m)
            runs = {}
            with torch.no_grad():
                for name, (prepare, product, _) in candidates.items():
                    prepared = [prepare(w) for w in weights]
                    got = product(x, prepared[0]).double()
                    errors[name] = max(errors.get(name, 0.0), ((got - want).abs().max() / want.abs().max()).item())
                    runs[name] = lambda product=product, prepared=prepared: [product(x, p) for p in prepared]
                times, ratios = time_products(runs, {n: c[2] for n, c in candidates.items()}, (m, K, N, copies),
                                              repeats, toy)
            for name in runs:
                cells.setdefault(name, []).append(f"{1e3 * statistics.median(times[name]):.3g} "
                                                  f"({statistics.median(ratios[name]):.2f}x)")
            del runs
        print(f"\n{title}\n\n| formulation | M = 1 | M = 8 | M = 32 | error |\n|---|---|---|---|---|")
        for name, row in cells.items():
            print(f"| {name} | {' | '.join(row)} | {errors[name]:.1e} |")


# ----------------------------------------------------------------------------- main


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
    p.add_argument("--plot", default=None, help="draw the roofline picture to this PNG (needs matplotlib)")
    p.add_argument("--compare", default=None, help="another run's --json (e.g. the GPU's): its measured columns")
    p.add_argument("--products", action="store_true", help="compare formulations of the small-row products instead")
    p.add_argument("--no-packed-weights", action="store_true",
                   help="the model's linears multiply with their weights as stored (as sample.py --no-packed-weights)")
    add_flags(p)  # --json: the machine, counts and times (what --compare reads)
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}.")
    use_threads(args.threads)
    config = model_config(args)
    if args.products:
        compare_products(config, args.repeats, args.toy)
        return 0
    compare = read_compare(args.compare)
    plt = pyplot() if args.plot else None  # before the minutes of measuring
    device = resolve_device(args.device)
    check_available(device)
    precision = inference_precision(args.dtype, device, pack=not args.no_packed_weights)
    compute_dtype = precision.autocast_dtype or precision.weights
    machine_rates = measure_machine(device, *machine_sizes(device, args.toy))
    shapes = TOY_SHAPES if args.toy else Shapes()
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
    if args.plot:
        plot(plt, rows, machine_rates, args.plot)
    return 0


if __name__ == "__main__":
    run_cli(main)
