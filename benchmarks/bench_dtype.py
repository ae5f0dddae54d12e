"""bf16 against fp32 inference on this machine: speed at mmBERT-base shape, agreement on a trained model.

References: minidiff/plumbing/device.py (what `--dtype bfloat16` means); LLaDA (arXiv 2502.09992);
mmBERT (2509.06888). Findings and each workload: docs/benchmarks.md ("bf16 on the CPU").

    python benchmarks/bench_dtype.py --threads 1                 # speed, mmBERT-base shape (22 layers)
    python benchmarks/bench_dtype.py --model runs/demo/cpt --mc-data morphology_tr.jsonl   # agreement only
    python benchmarks/bench_dtype.py --tokens-per-second --batches 1 --caches none dual --compile
    python benchmarks/bench_dtype.py --tokens-per-second --compile --device cuda   # gpu_check.sh --timings
    python benchmarks/bench_dtype.py --toy --json dtype.json     # any of the above at a tiny shape, as JSON too
"""
from __future__ import annotations

import argparse
import copy
import statistics
from contextlib import nullcontext

import torch
from common import banner, mmbert_base, parse, table_head, timed, tiny_shape, write_results

import minidiff
from minidiff.diffusion import DEFAULT_MC_SAMPLES
from minidiff.errors import UserError, run_cli
from minidiff.evaluation.answers import mc_loglik_many
from minidiff.evaluation.scoring import choice_pairs, load_examples, parse_task, score_examples
from minidiff.model import ModernBertMLM
from minidiff.plumbing.device import check_available, enable_tf32, inference_precision, resolve_device
from minidiff.speed.sampling import FastConfig, generate

CPU = torch.device("cpu")
PRECISIONS = ("float32", "bfloat16")


def machine_line(packed: bool, device: torch.device = CPU) -> str:
    """The machine banner and the weights' layout, for every table."""
    return f"{banner(device)}; {'packed weights' if packed else 'weights as stored'}"


def random_model_config(args):
    """mmBERT-base's shape with --layers layers (or the tiny shape with --toy)."""
    return tiny_shape() if args.toy else mmbert_base(num_hidden_layers=args.layers)


def both_precisions(model: torch.nn.Module, pack: bool, device: torch.device = CPU) -> dict:
    """name -> (model, Precision): fp32 as given and a copy prepared as `--dtype bfloat16`, packed if `pack`."""
    models = {}
    for name in PRECISIONS:
        precision = inference_precision(name, device, pack=pack)
        models[name] = (precision.prepare(copy.deepcopy(model) if name != "float32" else model), precision)
    return models


def workloads(model: ModernBertMLM, L: int = 32) -> dict:
    """name -> function(model) -> seconds for one call; the same inputs for every model."""
    config = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(L, config.hidden_size, generator=g)  # [32, H] one block's head outputs
    prompt = [config.bos_token_id] + torch.randint(5, config.vocab_size, (63,), generator=g).tolist()
    sampler = FastConfig.preset("diffutron-long", temperature=0.0, stop_strings=(), stop_at_eos=False,
                                   max_new_tokens=L, steps=4, block_length=L)
    mask, eos = config.mask_token_id, config.eos_token_id

    def decoder(m):
        return timed(lambda: m.decoder(x))[1]

    def step(m):
        out, seconds = timed(lambda: generate(m, [prompt], sampler, mask_id=mask, eos_id=eos))
        return seconds / out.num_forward

    def scoring(m):
        return timed(lambda: mc_loglik_many(m, [(prompt[:48], prompt[48:])], mask, pad_id=mask, num_samples=32,
                                            batch_size=32, generator=torch.Generator().manual_seed(0)))[1]

    return {f"decoder product [{L}, {config.hidden_size}] x [{config.hidden_size}, {config.vocab_size}]": decoder,
            f"sampler step (batch 1, prompt 64, block {L}, cache none)": step,
            "scoring batch (mc_loglik, 32 x 64 tokens)": scoring}


@torch.no_grad()
def speed(args) -> dict:
    config = random_model_config(args)
    torch.manual_seed(0)
    models = both_precisions(ModernBertMLM(config).eval(), not args.no_packed_weights)
    jobs = workloads(models["float32"][0])
    times = {(job, name): [] for job in jobs for name in PRECISIONS}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for job, run in jobs.items():
            for name, (model, precision) in models.items():
                with precision.autocast():
                    seconds = run(model)
                if repeat:
                    times[job, name].append(seconds)
    print(f"\nbf16 vs fp32 speed, random weights, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"vocabulary {config.vocab_size}; {machine_line(not args.no_packed_weights)}; median of {args.repeats} interleaved repeats\n")
    print(table_head("workload", "fp32 ms", "bf16 ms", "fp32 / bf16"))
    rows = []
    for job in jobs:
        fp32, bf16 = (statistics.median(times[job, name]) for name in PRECISIONS)
        rows.append({"workload": job, "fp32_ms": fp32 * 1e3, "bf16_ms": bf16 * 1e3, "fp32_over_bf16": fp32 / bf16})
        print(f"| {job} | {fp32 * 1e3:.1f} | {bf16 * 1e3:.1f} | {fp32 / bf16:.2f}x |")
    return {"config": config.to_dict(), "repeats": args.repeats, "rows": rows}


def mixed_prompts(config, batch: int, g: torch.Generator) -> list[list[int]]:
    """`batch` random prompts of mixed lengths, 16 to 64 tokens (after <bos>)."""
    lengths = [16 + (48 * i) // max(batch - 1, 1) for i in range(batch)]  # 16 .. 64, evenly spread
    return [[config.bos_token_id] + torch.randint(5, config.vocab_size, (n - 1,), generator=g).tolist()
            for n in lengths]


@torch.no_grad()
def tokens_per_second(args) -> dict:
    """Answer tokens per second of `generate`, batch x cache x precision (x eager / compiled with --compile)."""
    config, device = random_model_config(args), resolve_device(args.device)
    check_available(device)
    enable_tf32(device)
    torch.manual_seed(0)
    models = both_precisions(ModernBertMLM(config).eval(), not args.no_packed_weights, device)
    g = torch.Generator().manual_seed(2)
    prompts = {batch: mixed_prompts(config, batch, g) for batch in args.batches}
    # length_bucket 0: each batch on one canvas, the batch's rows in one forward
    sampler = FastConfig.preset(args.preset, temperature=0.0, stop_strings=(), stop_at_eos=False,
                                max_new_tokens=args.new_tokens, steps=args.new_tokens, length_bucket=0)
    mask, eos = config.mask_token_id, config.eos_token_id
    for model, precision in models.values():  # warm-up: one short call per precision and cache
        for cache in args.caches:
            with precision.autocast():
                generate(model, prompts[args.batches[0]][:1], sampler.replace(cache=cache, max_new_tokens=4, steps=4),
                         mask_id=mask, eos_id=eos)
    print(f"\ntokens per second, `generate`, random weights, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}; {args.preset} at temperature 0 with "
          f"{args.new_tokens} new tokens in {args.new_tokens} steps, prompts of 16-64 tokens; "
          f"{machine_line(not args.no_packed_weights, device)}\n")
    print(table_head("batch", "cache", "mode", "forwards", "fp32 tokens/s", "bf16 tokens/s", "bf16 / fp32"), flush=True)
    rows = []
    for batch in args.batches:
        for cache in args.caches:
            for compiled in (False, True) if args.compile else (False,):
                config_here = sampler.replace(cache=cache, compile=compiled)
                cells = []
                for name, (model, precision) in models.items():  # fp32 then bf16, back to back
                    with precision.autocast():
                        run = lambda: generate(model, prompts[batch], config_here, mask_id=mask, eos_id=eos)  # noqa: E731
                        if compiled:
                            torch._dynamo.reset()  # each setting compiles cold, within its own recompile budget
                            run()  # compiles for these shapes (untimed)
                        out, seconds = timed(run, device)
                    cells.append(batch * args.new_tokens / seconds)
                mode = "compiled" if compiled else "eager"
                rows.append({"batch": batch, "cache": cache, "mode": mode, "forwards": out.num_forward,
                             "fp32_tokens_per_s": cells[0], "bf16_tokens_per_s": cells[1]})
                print(f"| {batch} | {cache} | {mode} | {out.num_forward} | {cells[0]:.1f} | {cells[1]:.1f} | "
                      f"{cells[1] / cells[0]:.2f}x |", flush=True)  # row by row: a long run shows its progress
    return {"config": config.to_dict(), "preset": args.preset, "new_tokens": args.new_tokens, "rows": rows}


# each run: (label, --dtype value or "float64", Monte-Carlo seed); each later run is compared with the first
RUNS = (("fp32", "float32", 0), ("bf16", "bfloat16", 0), ("fp64", "float64", 0), ("fp32, seed 1", "float32", 1))


def load_in(model_dir: str, dtype: str, pack: bool):
    """(model, autocast context) for one run: a `--dtype` Precision, or plain float64 weights."""
    if dtype == "float64":
        return minidiff.load_model(model_dir, dtype=torch.float64).eval(), nullcontext()
    precision = inference_precision(dtype, CPU, pack=pack)
    return precision.prepare(minidiff.load_model(model_dir)).eval(), precision.autocast()


@torch.no_grad()
def agreement(args) -> dict:
    tok = minidiff.load_tokenizer(args.model)
    every = load_examples(parse_task(f"mc:{args.mc_data}"))
    examples = every[: args.rows]  # scored; the greedy prompts come from the first rows whatever --rows says
    prompts = [choice_pairs(tok, ex)[0][0] for ex in every[: args.num_prompts]]  # <bos> + prompt ids
    sampler = FastConfig.preset("diffutron-short", temperature=0.0, stop_strings=(), stop_at_eos=False)
    answers, scores, per_forward = {}, {}, {}
    for label, dtype, seed in RUNS:
        model, context = load_in(args.model, dtype, not args.no_packed_weights)
        with context:
            if seed == 0:  # temperature 0: the seed changes no token
                answers[label] = [generate(model, [p], sampler, mask_id=tok.mask_id, eos_id=tok.eos_id).answers()[0]
                                  for p in prompts]
                fast = [generate(model, [p], sampler.replace(threshold=args.threshold), mask_id=tok.mask_id,
                                 eos_id=tok.eos_id).num_forward for p in prompts]
                per_forward[label] = len(prompts) * sampler.max_new_tokens / sum(fast)
            scores[label] = score_examples(model, tok, examples, mc_samples=args.mc_samples, seed=seed, progress=False)
    print(f"\nbf16 vs fp32 agreement, {args.model} ({model.num_parameters():,} parameters), {len(prompts)} greedy "
          f"prompts x {sampler.max_new_tokens} tokens (diffutron-short, temperature 0), {len(examples)} rows of "
          f"{args.mc_data} ({args.mc_samples} samples per multi-token choice); {machine_line(not args.no_packed_weights)}\n")
    print(table_head("compared with fp32, seed 0", "greedy tokens equal", "prompts all equal",
                     "mean / max abs loglik diff", "rows whose argmax flips", "accuracy"))
    reference = RUNS[0][0]
    rows = [{"run": label, "greedy": greedy_agreement(answers, reference, label),
             "scores": score_agreement(scores[reference], scores[label], examples)} for label, _, _ in RUNS]
    for row in rows:
        print(f"| {row['run']} | {greedy_cells(row['greedy'])} | {score_cells(row['scores'])} |")
    print(f"\nthreshold decoding ({args.threshold}), the same prompts: tokens committed per forward "
          + ", ".join(f"{label} {value:.2f}" for label, value in per_forward.items()))
    return {"model": args.model, "mc_data": args.mc_data, "rows": rows, "threshold": args.threshold,
            "tokens_per_forward": per_forward}


def greedy_agreement(answers: dict, reference: str, label: str) -> dict | None:
    """Committed tokens equal to the reference run's, prompts equal throughout (None: no greedy run)."""
    if label not in answers:
        return None
    pairs = list(zip(answers[reference], answers[label]))
    return {"tokens_equal": sum(a == b for x, y in pairs for a, b in zip(x, y)),
            "tokens": sum(len(x) for x, _ in pairs), "prompts_equal": sum(x == y for x, y in pairs),
            "prompts": len(pairs)}


def score_agreement(reference: list, scores: list, examples) -> dict:
    """mean / max |loglik - reference| over the choices, rows whose argmax differs, accuracy."""
    diffs = [abs(a - b) for x, y in zip(reference, scores) for a, b in zip(x, y)]
    picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
    flips = sum(a != max(range(len(r)), key=r.__getitem__) for a, r in zip(picks, reference))
    return {"mean_abs_diff": statistics.fmean(diffs), "max_abs_diff": max(diffs), "choices": len(diffs),
            "flips": flips, "rows": len(examples),
            "accuracy": sum(p == ex.label for p, ex in zip(picks, examples)) / len(examples)}


def greedy_cells(greedy: dict | None) -> str:
    if greedy is None:
        return "(as fp32) | (as fp32)"
    equal, total = greedy["tokens_equal"], greedy["tokens"]
    return f"{equal}/{total} ({equal / total:.1%}) | {greedy['prompts_equal']}/{greedy['prompts']}"


def score_cells(s: dict) -> str:
    return (f"{s['mean_abs_diff']:.4f} / {s['max_abs_diff']:.4f} ({s['choices']} choices) | "
            f"{s['flips']}/{s['rows']} ({s['flips'] / s['rows']:.1%}) | {s['accuracy']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-packed-weights", action="store_true",
                   help="multiply with the weights as stored (default: packed copies, as sample.py and evaluate.py)")
    p.add_argument("--layers", type=int, default=22, help="layers of the random mmBERT-base-shaped model (default 22)")
    p.add_argument("--toy", action="store_true", help="speed on a tiny shape (hidden 64, 2 layers, vocabulary 1000)")
    p.add_argument("--repeats", type=int, default=3, help="timed, interleaved rounds after a warm-up (median)")
    p.add_argument("--model", help="a trained model directory: measure agreement (and skip speed unless --speed)")
    p.add_argument("--mc-data", help="with --model: rows {\"prompt\", \"choices\", \"label\"} to score and prompt from")
    p.add_argument("--num-prompts", type=int, default=10, help="greedy generations per precision (default 10)")
    p.add_argument("--mc-samples", type=int, default=DEFAULT_MC_SAMPLES,
                   help=f"Monte-Carlo samples per multi-token choice (default {DEFAULT_MC_SAMPLES})")
    p.add_argument("--threshold", type=float, default=0.9, help="with --model: threshold decoding's confidence")
    p.add_argument("--rows", type=int, default=None, help="score only the first ROWS rows of --mc-data")
    p.add_argument("--speed", action="store_true", help="with --model: measure speed too")
    p.add_argument("--tokens-per-second", action="store_true",
                   help="instead: answer tokens per second of generate, batch x cache x precision")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="with --tokens-per-second (default 1 8)")
    p.add_argument("--caches", nargs="+", default=["none", "prefix", "dual"], choices=["none", "prefix", "dual"],
                   help="with --tokens-per-second: the key/value caches (default all three)")
    p.add_argument("--compile", action="store_true",
                   help="with --tokens-per-second: also the compiled sampler (torch.compile; each shape compiles once, untimed)")
    p.add_argument("--new-tokens", type=int, default=32, help="with --tokens-per-second: tokens per answer")
    p.add_argument("--preset", default="diffutron-short", help="with --tokens-per-second: the sampler preset")
    p.add_argument("--device", default="cpu", help="with --tokens-per-second: cpu (default), cuda or cuda:N")
    args = parse(p, argv)
    if min(args.repeats, args.layers, args.num_prompts, args.mc_samples, args.rows or 1, args.new_tokens,
           *args.batches) < 1:
        raise UserError("--repeats, --layers, --num-prompts, --mc-samples, --rows, --new-tokens and --batches "
                        "must be at least 1.")
    if args.model and not args.mc_data:
        raise UserError("--model needs --mc-data FILE.jsonl (rows {\"prompt\", \"choices\", \"label\"}) to compare on.")
    results = {}
    if args.tokens_per_second:
        results["tokens_per_second"] = tokens_per_second(args)
    else:
        if not args.model or args.speed:
            results["speed"] = speed(args)
        if args.model:
            results["agreement"] = agreement(args)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    run_cli(main)
