"""Evaluate a model: the MLM perplexity probe and zero-shot multiple-choice tasks (CETVEL subset).

References: Diffutron (arXiv 2603.20466, Table 4); HF `run_mlm.py` (perplexity probe) and
lm-evaluation-harness (multiple choice). Reader's page: docs/evaluation.md.

    python evaluate.py --model out/cpt --task perplexity:essays.txt \\
        --task belebele_tr:belebele_tur.jsonl --task ironytr:IronyTR_val.csv \\
        --out results.json --compare baseline.json

Tasks: perplexity:SRC (any file/dir/hf:// source the data module reads), mc:FILE.jsonl (rows
{"prompt", "choices", "label"}), or one of belebele_tr, exams_tr, ironytr, news_cat, mnli_tr,
sts_tr, xcopa_tr, each as NAME:FILE (a local file in the hub dataset's own schema) or NAME alone
(read from the hub; needs network). Writes results.json (per task: metrics, n, settings, seed,
model, and for multiple choice each metric's standard error, how many answers were scored
exactly and how many by Monte Carlo) atomically and prints markdown tables shaped like the
paper's Table 4, multiple-choice cells as `value ± standard error` (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from minidiff.diffusion import DEFAULT_MC_SAMPLES
from minidiff.errors import UserError, run_cli
from minidiff.evaluation.answers import SCORINGS
from minidiff.evaluation.scoring import DEFAULT_SCORING, MAX_BATCH_SIZE
from minidiff.plumbing.device import add_precision_flags
from minidiff.plumbing.files import write_json, write_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or hub id (config.json, "
                   "model.safetensors, tokenizer.json)")
    p.add_argument("--task", action="append", required=True, metavar="T",
                   help="perplexity:SRC | mc:FILE | NAME[:FILE]; repeat for several tasks")
    p.add_argument("--out", required=True, help="results JSON to write (atomically)")
    p.add_argument("--compare", action="append", default=[], metavar="OLD.json",
                   help="earlier results files; each adds a column to the tables (a cell ending in "
                   "'≈' differs from this run's by less than their combined standard error)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N rows (multiple choice) / documents (perplexity)")
    p.add_argument("--scoring", choices=SCORINGS, default=DEFAULT_SCORING,
                   help="answer log-likelihoods: exact (all 2^L - 1 masks of an answer of L tokens), "
                   "mc (Monte Carlo, --mc-samples draws; one-token answers exact), auto (exact when "
                   "2^L - 1 <= --mc-samples, Monte Carlo beyond)")
    p.add_argument("--mc-samples", type=int, default=DEFAULT_MC_SAMPLES,
                   help="Monte-Carlo samples per multi-token answer that is not scored exactly")
    p.add_argument("--batch-size", type=int, default=32,
                   help=f"sequences per forward pass (at most {MAX_BATCH_SIZE})")
    p.add_argument("--per-item", default=None, metavar="FILE.jsonl",
                   help="also write every multiple-choice item's choice scores and errors (atomically)")
    p.add_argument("--drop-unlabeled", action="store_true",
                   help="leave out items without a gold label (MNLI_TR's label -1); by default they "
                   "are kept and count as wrong, as in lm-eval")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (masks, MC samples)")
    p.add_argument("--max-len", type=int, default=512, help="perplexity block length in tokens "
                   "(clamped to the model's context, max_position_embeddings, with a note)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="perplexity: fraction of tokens masked")
    p.add_argument("--mlm-replace", action="store_true",
                   help="perplexity: BERT 80/10/10 replacement (mask/random/keep) instead of all <mask>")
    p.add_argument("--no-nelbo", action="store_true", help="perplexity: skip the NELBO bound column")
    p.add_argument("--metric", choices=("acc", "acc_norm", "f1", "macro_f1"), default="acc",
                   help="multiple-choice metric shown in the table (the JSON has all)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                   "a bare cuda is cuda:LOCAL_RANK)")
    add_precision_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected a positive number of rows")
    if args.mc_samples < 1:
        raise UserError(f"--mc-samples {args.mc_samples}: expected at least 1")
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"--batch-size {args.batch_size}: expected 1 to {MAX_BATCH_SIZE} sequences "
                        "per forward (Monte-Carlo samples beyond it run in further forwards)")
    if args.max_len < 2:
        raise UserError(f"--max-len {args.max_len}: expected at least 2 tokens")
    from minidiff.plumbing.device import inference_precision, resolve_device

    inference_precision(args.dtype, resolve_device(args.device))  # a bad --dtype/--device fails here
    if not 0.0 < args.mask_prob < 1.0:
        raise UserError(f"--mask-prob {args.mask_prob}: expected a fraction between 0 and 1")
    out = Path(args.out)
    for flag, path in (("--out", out), ("--per-item", args.per_item)):
        if path is not None and Path(path).is_dir():
            raise UserError(f"{flag} {path} is a directory; expected a file path")


def read_compare(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--compare {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--compare {path} is not a JSON file written by evaluate.py") from None
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise UserError(f"--compare {path} has no 'tasks' object; expected a results file of evaluate.py")
    return results


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def report(key: str, result: dict) -> None:
    """One stderr line per task on what was scored how, and on cuts to the model's context."""
    settings = result["settings"]
    if result["kind"] == "perplexity":
        if settings["clamped_to_context"]:
            note(f"{key}: --max-len {settings['max_len']} exceeds the model's context; blocks of "
                 f"{settings['block_len']} tokens instead")
        return
    counts = result["answers_scored"]
    note(f"{key}: {counts['exact']} answers scored exactly, {counts['mc']} by Monte Carlo "
         f"({settings['mc_samples']} samples)")
    if result["truncated_prompts"]:
        note(f"{key}: {result['truncated_prompts']} of {result['n']} prompts cut from the left to fit "
             f"the model's context of {settings['context']} tokens")


def _error(result: dict | None, metric: str) -> float | None:
    """The metric's total standard error, if the result has one."""
    return ((result or {}).get("errors") or {}).get(metric, {}).get("se")


def _cell(result: dict | None, metric: str, first: dict | None = None) -> str:
    """`value ± se` (x 100 unless a perplexity); with `first` (this run's result) a trailing
    `≈` when |value - first| is smaller than sqrt(se^2 + se_first^2)."""
    if result is None or metric not in result.get("metrics", {}):
        return "-"
    value = result["metrics"][metric]
    if metric.endswith("perplexity"):
        return f"{value:.2f}"
    error, other = _error(result, metric), _error(first, metric)
    text = f"{100 * value:.2f}" + ("" if error is None else f" ± {100 * error:.2f}")
    if first is not None and first is not result and metric in first.get("metrics", {}) and error is not None \
            and other is not None and abs(value - first["metrics"][metric]) < math.hypot(error, other):
        text += " ≈"
    return text


def _average(tasks: dict, keys: Sequence[str], metric: str) -> str:
    """mean over the tasks ± sqrt(sum se^2) / k (tasks independent); `(k/K)` if some miss."""
    have = [k for k in keys if k in tasks and metric in tasks[k]["metrics"]]
    if not have:
        return "-"
    text = f"{100 * sum(tasks[k]['metrics'][metric] for k in have) / len(have):.2f}"
    errors = [_error(tasks[k], metric) for k in have]
    if None not in errors:
        text += f" ± {100 * math.sqrt(sum(e * e for e in errors)) / len(have):.2f}"
    return text + ("" if len(have) == len(keys) else f" ({len(have)}/{len(keys)})")


def markdown_tables(columns: Sequence[tuple[str, dict]], metric: str = "acc") -> str:
    """Table 4 shape: the first run's multiple-choice tasks as rows, one column per run (`columns`:
    [(header, results["tasks"]), ...]), the average last; perplexity tasks in a table of their own."""
    lines: list[str] = []
    first = columns[0][1]  # rows: the tasks of the first column (this run)
    ppl_keys = [k for k, r in first.items() if r["kind"] == "perplexity"]
    if ppl_keys:
        lines += ["| perplexity | " + " | ".join(f"{h} (MLM) | {h} (NELBO bound)" for h, _ in columns) + " |",
                  "|---|" + "---:|---:|" * len(columns)]
        for key in ppl_keys:
            cells = [f"{_cell(t.get(key), 'perplexity')} | {_cell(t.get(key), 'nelbo_perplexity')}"
                     for _, t in columns]
            lines.append(f"| {first[key]['title']} | " + " | ".join(cells) + " |")
        lines.append("")
    mc_keys = [k for k, r in first.items() if r["kind"] == "mc"]
    if mc_keys:
        lines += [f"| task ({metric} x 100) | " + " | ".join(h for h, _ in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for key in mc_keys:
            cells = [_cell(t.get(key), metric, first[key]) for _, t in columns]
            lines.append(f"| {first[key]['title']} | " + " | ".join(cells) + " |")
        lines.append("| **Average** | " + " | ".join(_average(t, mc_keys, metric) for _, t in columns) + " |")
    return "\n".join(lines).strip()


def read_inputs(args, specs) -> dict:
    """Every task's documents or examples, read and checked (before the model loads: bad input
    fails fast and writes nothing)."""
    from minidiff.data import readers as data
    from minidiff.evaluation import scoring as evaluation

    inputs = {}
    for spec in specs:
        if spec.kind == "perplexity":
            texts = data.read_documents(spec.source).texts[: args.limit]
            if not texts:
                raise UserError(f"--task {spec.key}: no documents in {spec.source}")
            inputs[spec.key] = {"texts": texts}
        else:
            examples = evaluation.load_examples(spec, args.limit)
            unlabeled = sum(ex.label < 0 for ex in examples)
            if unlabeled:
                action = "left out (--drop-unlabeled)" if args.drop_unlabeled else "counted wrong, as lm-eval does"
                note(f"{spec.key}: {unlabeled} of {len(examples)} items have no gold label; {action}")
            if args.drop_unlabeled:
                examples = [ex for ex in examples if ex.label >= 0]
                if not examples:
                    raise UserError(f"--task {spec.key}: no labeled items left after --drop-unlabeled")
            inputs[spec.key] = {"examples": examples, "dropped_unlabeled": unlabeled if args.drop_unlabeled else 0}
    return inputs


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from minidiff.evaluation import scoring as evaluation

    specs = [evaluation.parse_task(t) for t in args.task]
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise UserError(f"--task given twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    compare = [(Path(p).stem, read_compare(p)["tasks"]) for p in args.compare]
    inputs = read_inputs(args, specs)

    import torch

    import minidiff
    from minidiff.plumbing.device import check_available, enable_tf32, inference_precision, resolve_device

    device = resolve_device(args.device)
    check_available(device)
    enable_tf32(device)
    precision = inference_precision(args.dtype, device, pack=not args.no_packed_weights)
    model = precision.prepare(minidiff.load_model(args.model))
    tok = minidiff.load_tokenizer(args.model)
    model.eval()
    tasks, items = {}, []
    for spec in specs:
        given = dict(inputs[spec.key])
        dropped = given.pop("dropped_unlabeled", None)
        with precision.autocast():
            result = evaluation.run_task(
                model, tok, spec, **given, mc_samples=args.mc_samples, scoring=args.scoring,
                batch_size=args.batch_size, seed=args.seed, max_len=args.max_len,
                mask_prob=args.mask_prob, mlm_replace=args.mlm_replace, nelbo=not args.no_nelbo,
                progress=not args.no_progress, items_out=items)
        result.update({"model": args.model, "seed": args.seed, "limit": args.limit})
        if dropped is not None:
            result["dropped_unlabeled"] = dropped
        report(spec.key, result)
        tasks[spec.key] = result
    results = {"model": args.model, "seed": args.seed, "device": str(device), "dtype": args.dtype,
               "precision": precision.describe(),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "minidiff": minidiff.__version__, "tasks": tasks}
    if args.per_item:
        write_text(args.per_item, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in items))
    write_json(args.out, results)
    header = Path(args.model).name or args.model
    print(markdown_tables([(header, tasks)] + compare, metric=args.metric))
    return 0


if __name__ == "__main__":
    run_cli(main)
