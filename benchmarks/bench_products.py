"""Small-row products (the decoder and each layer's four at M = 1, 8, 32 rows) by every
formulation this build offers, each against its roofline bound; what minidiff/speed/packed.py
chose from. Findings: docs/benchmarks.md ("Small-row products").

    python benchmarks/bench_products.py --threads 1 --repeats 3     # mmBERT-base shape, about 1.5 min
    python benchmarks/bench_products.py --toy                       # a tiny shape (seconds)
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from common import seconds, use_threads
from roofline import bound, measure_machine, model_config

from minidiff.errors import UserError, run_cli
from minidiff.model import ModelConfig
from minidiff.speed.packed import PACK_ROWS


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
    """Seconds and time / bound of each run over interleaved rounds, each round's bound measured afresh."""
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
    """Each small-row product of the model (each layer's four over all layers, so the weights come
    from memory as in a forward) by every candidate: median ms and median time / bound."""
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="a tiny shape (hidden 64, 2 layers, vocabulary 1000)")
    p.add_argument("--config", default=None, help="a config.json to take the shape from (default: mmBERT-base)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}.")
    use_threads(args.threads)
    compare_products(model_config(args), args.repeats, args.toy)
    return 0


if __name__ == "__main__":
    run_cli(main)
