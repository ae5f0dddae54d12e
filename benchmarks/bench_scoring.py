"""Multiple-choice accuracy against the number of Monte-Carlo samples, and exact/auto scoring.

References: LLaDA (arXiv 2502.09992: the l/L estimator); docs/evaluation.md "How many samples".

    python benchmarks/bench_scoring.py --model runs/demo/cpt --task benchmarks/data/morphology_tr.jsonl \\
        --samples 8 16 32 64 128 256 --seeds 0 1 2 --auto 32

For each (scoring, samples, seed): acc and acc_norm with their standard errors (total, and the
Monte-Carlo part alone; evaluation.metric_errors), how many answers were scored exactly, and
the seconds and forward rows it took. Printed as markdown rows.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minidiff  # noqa: E402
from minidiff.evaluation import scoring as evaluation  # noqa: E402


def row(model, tok, examples, scoring: str, samples: int, seed: int) -> str:
    start = time.perf_counter()
    scored = evaluation.score_items(model, tok, examples, mc_samples=samples, seed=seed,
                                    scoring=scoring, batch_size=64, progress=False)
    seconds = time.perf_counter() - start
    metrics = evaluation.mc_metrics(examples, scored.scores, ("acc", "acc_norm"))
    errors = evaluation.metric_errors(examples, scored, ("acc", "acc_norm"), seed=seed)
    cells = [f"{100 * metrics[k]:.1f} ± {100 * errors[k]['se']:.1f} (mc {100 * errors[k]['mc_se']:.1f})"
             for k in ("acc", "acc_norm")]
    counts = scored.counts()
    return (f"| {scoring} | {samples} | {seed} | {cells[0]} | {cells[1]} | {counts['exact']}/"
            f"{counts['exact'] + counts['mc']} | {seconds:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True, help="an mc:FILE.jsonl task file")
    p.add_argument("--samples", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--auto", type=int, nargs="*", default=[32], help="sample counts for scoring=auto")
    p.add_argument("--exact", action="store_true", help="also the exact enumeration (one seed)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = minidiff.load_model(args.model).eval(), minidiff.load_tokenizer(args.model)
    examples = evaluation.load_examples(evaluation.parse_task(f"mc:{args.task}"))
    print("| scoring | samples | seed | acc ± se (mc part) | acc_norm ± se (mc part) | exact answers | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    runs = [("mc", n, s) for n in args.samples for s in args.seeds]
    runs += [("auto", n, s) for n in args.auto for s in args.seeds]
    runs += [("exact", 0, args.seeds[0])] if args.exact else []
    for scoring, samples, seed in runs:
        print(row(model, tok, examples, scoring, max(samples, 1), seed), flush=True)


if __name__ == "__main__":
    main()
