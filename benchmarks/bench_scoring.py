"""Multiple-choice accuracy against the number of Monte-Carlo samples, and exact/auto scoring.

References: LLaDA (arXiv 2502.09992: the l/L estimator). Findings: docs/benchmarks.md
("Scoring: how many samples"), docs/evaluation.md ("How many samples").

    python benchmarks/bench_scoring.py --model runs/demo/cpt --task benchmarks/data/morphology_tr.jsonl \\
        --samples 8 16 32 64 128 256 --seeds 0 1 2 --auto 32 [--json scoring.json]
"""
from __future__ import annotations

import argparse

from common import banner, parse, table_head, timed, write_results

import minidiff
from minidiff.evaluation import scoring


def measure(model, tok, examples, how: str, samples: int, seed: int) -> dict:
    """One (scoring, samples, seed) run: acc and acc_norm with their errors, exact answers, seconds."""
    scored, seconds = timed(lambda: scoring.score_items(model, tok, examples, mc_samples=samples, seed=seed,
                                                        scoring=how, batch_size=64, progress=False))
    metrics = scoring.mc_metrics(examples, scored.scores, ("acc", "acc_norm"))
    errors = scoring.metric_errors(examples, scored, ("acc", "acc_norm"), seed=seed)
    counts = scored.counts()
    return {"scoring": how, "samples": samples, "seed": seed, "seconds": seconds, "exact": counts["exact"],
            "answers": counts["exact"] + counts["mc"],
            **{k: {"value": metrics[k], "se": errors[k]["se"], "mc_se": errors[k]["mc_se"]} for k in metrics}}


def markdown_row(r: dict) -> str:
    cells = [f"{100 * r[k]['value']:.1f} ± {100 * r[k]['se']:.1f} (mc {100 * r[k]['mc_se']:.1f})"
             for k in ("acc", "acc_norm")]
    return (f"| {r['scoring']} | {r['samples']} | {r['seed']} | {cells[0]} | {cells[1]} | {r['exact']}/"
            f"{r['answers']} | {r['seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True, help="an mc:FILE.jsonl task file")
    p.add_argument("--samples", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--auto", type=int, nargs="*", default=[32], help="sample counts for scoring=auto")
    p.add_argument("--exact", action="store_true", help="also the exact enumeration (one seed)")
    args = parse(p, threads=1)
    model, tok = minidiff.load_model(args.model).eval(), minidiff.load_tokenizer(args.model)
    examples = scoring.load_examples(scoring.parse_task(f"mc:{args.task}"))
    print(banner() + "\n")
    print(table_head("scoring", "samples", "seed", "acc ± se (mc part)", "acc_norm ± se (mc part)", "exact answers",
                     "s", right=6))
    runs = [("mc", n, s) for n in args.samples for s in args.seeds]
    runs += [("auto", n, s) for n in args.auto for s in args.seeds]
    runs += [("exact", 0, args.seeds[0])] if args.exact else []
    rows = []
    for how, samples, seed in runs:
        rows.append(measure(model, tok, examples, how, max(samples, 1), seed))
        print(markdown_row(rows[-1]), flush=True)
    write_results(args.json, {"model": args.model, "task": args.task, "rows": rows})


if __name__ == "__main__":
    main()
