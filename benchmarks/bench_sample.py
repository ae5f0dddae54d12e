"""Sampling speed: minidiff.sampler.generate vs a reference with full-canvas logits, threshold decoding, key/value caches.

References: LLaDA (arXiv 2502.09992), Fast-dLLM (2505.22618); the reference is dllm's LLaDA
sampler and the Diffutron fork's step, written plainly here. Findings: docs/benchmarks.md.

    python benchmarks/bench_sample.py                    # random mmBERT-shaped model (768 hidden, 256k vocab, 2 layers)
    python benchmarks/bench_sample.py --layers 22 --cache none prefix dual --threads 1   # mmBERT-base depth
    python benchmarks/bench_sample.py --model DIR --text-data speeches.jsonl --cache none prefix dual
    python benchmarks/bench_sample.py --model runs/demo/sft --chat-data runs/demo/data/sft_train.jsonl
    python benchmarks/bench_sample.py --json sample.json # any of the above, the table as JSON too

Both run diffutron-long at temperature 0, so their tokens must be equal (asserted); the rest report agreement.
"""
from __future__ import annotations

import argparse
import math

import torch
from common import banner, mmbert_base, parse, timed, write_results
from roofline import Counter  # FLOPs counted from the dispatched ops

import minidiff
from minidiff.data import chat
from minidiff.data.readers import read_rows
from minidiff.errors import UserError, run_cli
from minidiff.model import ModernBertMLM
from minidiff.sampler import SamplerConfig, transfer_counts
from minidiff.speed.packed import pack_weights
from minidiff.speed.sampling import FastConfig, generate


@torch.no_grad()
def reference_generate(model, prompt: list[int], config: SamplerConfig, mask_id: int, eos_id: int):
    """One prompt, the dllm/fork loop with full-canvas logits (no cfg, temperature 0)."""
    n, L = len(prompt), config.block_length
    x = torch.tensor([prompt + [mask_id] * config.max_new_tokens])
    num_blocks = math.ceil(config.max_new_tokens / L)
    steps = math.ceil(config.steps / num_blocks)
    calls = 0
    for b in range(num_blocks):
        m = int((x[0, n + b * L: n + (b + 1) * L] == mask_id).sum())
        for k in transfer_counts(m, steps, config.unmasking):
            logits = model(x)  # [1, T, V]: head + vocabulary projection everywhere
            ids = torch.unique(x[0])
            ids = ids[(ids != mask_id) & (ids != eos_id)]
            sl = logits[0][:, ids]
            logits[0][:, ids] = torch.where(sl > 0, sl / config.repetition_penalty, sl * config.repetition_penalty)
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            p[0, n + (b + 1) * L:] = -math.inf
            conf = torch.where(x == mask_id, p, torch.full_like(p, -math.inf))
            idx = torch.topk(conf[0], k).indices
            x[0, idx] = x0[0, idx]
            calls += 1
    return x, calls


def main() -> None:
    args = parse_args()
    model, tok, mask_id, eos_id, prompts, what = model_and_prompts(args)
    if not args.no_packed_weights:
        pack_weights(model)  # every sampler, the reference too, multiplies with packed weights (as sample.py)
    # length_bucket 0: the reference's unpadded canvas (a batch of one needs no bucket to equal alone)
    config = FastConfig.preset("diffutron-long", temperature=0.0, stop_strings=(), stop_at_eos=False,
                               max_new_tokens=args.max_new_tokens, steps=args.max_new_tokens, length_bucket=0)
    generate(model, [prompts[0]], config.replace(max_new_tokens=4, steps=4), mask_id=mask_id, eos_id=eos_id)  # warm-up
    samplers = all_samplers(model, config, args, prompts, mask_id, eos_id)
    names = list(samplers)
    flops = {name: count_flops(lambda: samplers[name](prompts[0])) for name in names} if args.flops else {}
    best, calls, answers = run_samplers(samplers, prompts, config.max_new_tokens, args.repeats)
    report(args, what, tok, prompts, config.max_new_tokens, best, calls, answers, flops)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a trained model directory (with tokenizer); default: random mmBERT-shaped")
    p.add_argument("--layers", type=int, default=2, help="layers of the random model (mmBERT-base: 22)")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, nargs="*", default=[0.9],
                   help="confidence threshold(s) for the threshold-decoding rows (default 0.9; none: no such rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-data", help="with --model: a messages-format .jsonl whose questions are the prompts")
    p.add_argument("--text-data", help="with --model: a .jsonl of {\"text\": ...} rows to continue as plain text")
    p.add_argument("--num-prompts", type=int, default=8, help="with --chat-data / --text-data: how many prompts (default 8)")
    p.add_argument("--cache", nargs="+", default=["none"], choices=["none", "prefix", "dual"],
                   help="generate with each of these key/value caches (default: none only)")
    p.add_argument("--show", action="store_true", help="print each sampler's answers (with --model)")
    p.add_argument("--flops", action="store_true",
                   help="count each sampler's FLOPs on the first prompt (roofline.py's counter, one more untimed "
                        "run each) and set its speed-up against its FLOP ratio to the reference")
    p.add_argument("--no-packed-weights", action="store_true",
                   help="every sampler multiplies with the weights as stored (default: packed copies, as sample.py)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the three samplers this many times, interleaved, and keep each one's fastest")
    return parse(p)


def model_and_prompts(args):
    """(model, tokenizer or None, mask id, eos id, prompt ids, what the model is)."""
    if args.model:
        model = minidiff.load_model(args.model)
        tok = minidiff.load_tokenizer(args.model)
        mask_id, eos_id = tok.mask_id, tok.eos_id
        if args.chat_data:
            prompts = chat_prompts(tok, args)
        elif args.text_data:
            prompts = text_prompts(tok, args)
        else:
            prompts = [generic_prompt(tok, args.prompt_length)]
        what = f"{args.model} ({model.num_parameters():,} parameters)"
    else:
        torch.manual_seed(args.seed)
        config = mmbert_base(num_hidden_layers=args.layers)
        model = ModernBertMLM(config).eval()
        tok, mask_id, eos_id = None, config.mask_token_id, config.eos_token_id
        g = torch.Generator().manual_seed(args.seed)
        prompts = [[config.bos_token_id] + torch.randint(5, config.vocab_size, (args.prompt_length - 1,),
                                                         generator=g).tolist()]
        what = f"random mmBERT-shaped, {args.layers} layers ({model.num_parameters():,} parameters)"
    return model, tok, mask_id, eos_id, prompts, what


def all_samplers(model, config, args, prompts, mask_id: int, eos_id: int) -> dict:
    """name -> function(prompt) -> (sequences [1, T], model calls); the reference first."""
    def run_generate(sampler_config):
        def run(prompt):
            out = generate(model, [prompt], sampler_config, mask_id=mask_id, eos_id=eos_id)
            return out.sequences, out.num_forward
        return run

    samplers = {"reference (full-canvas logits)": lambda prompt: reference_generate(model, prompt, config, mask_id, eos_id)}
    for cache in dict.fromkeys(args.cache):
        name = "generate (block logits only)" if cache == "none" else f"generate, cache {cache}"
        cached = config.replace(cache=cache)
        samplers[name] = run_generate(cached)
        if cache != "none":
            generate(model, [prompts[0]], cached.replace(max_new_tokens=4, steps=4), mask_id=mask_id, eos_id=eos_id)
        for threshold in args.threshold:
            samplers[f"{name.split(' (')[0]}, threshold {threshold}"] = run_generate(cached.replace(threshold=threshold))
    return samplers


def run_samplers(samplers: dict, prompts: list, n: int, repeats: int):
    """Each sampler's fastest total time over `repeats` interleaved rounds, its model calls and answers."""
    names = list(samplers)
    best = dict.fromkeys(names, math.inf)  # fastest time over the repeats, summed over prompts
    calls = dict.fromkeys(names, 0)
    answers = {name: [] for name in names}
    for repeat in range(repeats):  # interleaved, so a busy moment of the machine hits all of them
        total = dict.fromkeys(names, 0.0)
        for prompt in prompts:
            answer = slice(len(prompt), len(prompt) + n)
            for name in names:
                (sequences, num_calls), seconds = timed(lambda: samplers[name](prompt))
                total[name] += seconds
                if repeat == 0:
                    calls[name] += num_calls
                    answers[name].append(sequences[0, answer])
            exact = "generate (block logits only)"
            if repeat == 0 and exact in names and not torch.equal(answers[exact][-1], answers[names[0]][-1]):
                raise AssertionError("generate and the reference committed different tokens")
        best = {name: min(best[name], total[name]) for name in names}
    return best, calls, answers


def report(args, what: str, tok, prompts: list, n: int, best: dict, calls: dict, answers: dict, flops: dict) -> None:
    """The table (and --show's answers), and the JSON."""
    names = list(best)
    tokens = n * len(prompts)
    reference = answers[names[0]]
    equal = {name: sum(int((a == r).sum()) for a, r in zip(answers[name], reference)) for name in names}
    if args.chat_data:
        source = f"{len(prompts)} chat prompts from {args.chat_data}"
    elif args.text_data:
        source = f"{len(prompts)} plain-text prompts of {args.prompt_length} tokens from {args.text_data}"
    else:
        source = f"prompt {len(prompts[0])} tokens"
    rows = []
    for name in names:
        row = {"sampler": name, "calls": calls[name], "seconds": best[name], "tokens_per_s": tokens / best[name],
               "speedup": best[names[0]] / best[name], "tokens_equal": equal[name], "tokens": tokens}
        if flops:
            row.update(flops=flops[name], flop_ratio=flops[names[0]] / flops[name])  # reference FLOPs / this one's
        rows.append(row)
    print(f"\nSampling, {what}; {source}, {n} new tokens each, diffutron-long (block 32, penalty 1.2), "
          f"temperature 0, batch 1, fastest of {args.repeats} run(s), "
          f"{'weights as stored' if args.no_packed_weights else 'packed weights'}")
    print(banner() + "\n")
    print_table(rows, bool(flops))
    shown = [{"prompt": tok.decode(prompt), "answers": {name: tok.decode(answers[name][i].tolist()) for name in names}}
             for i, prompt in enumerate(prompts)] if args.show and tok is not None else []
    for i, prompt in enumerate(shown):
        print(f"\nprompt {i}: {prompt['prompt']!r}")
        for name, answer in prompt["answers"].items():
            print(f"  {name}: {answer!r}")
    if not args.model:
        print("\nA random model is rarely confident, so threshold decoding commits about one token per "
              "step here; its speed-up shows on a trained model (--model DIR --chat-data FILE).")
    write_results(args.json, {"model": what, "source": source, "prompts": len(prompts), "new_tokens": n,
                              "repeats": args.repeats, "packed_weights": not args.no_packed_weights, "rows": rows,
                              "shown": shown})


def print_table(rows: list[dict], flops: bool) -> None:
    flop_header = " GFLOP (prompt 0) | FLOP ratio | speed-up / FLOP ratio |" if flops else ""
    print(f"| sampler | model calls | seconds | tokens/s | speed-up | tokens equal to reference | tokens differing |"
          f"{flop_header}")
    print("|---|---|---|---|---|---|---|" + "---|" * (3 if flops else 0))
    for r in rows:
        line = (f"| {r['sampler']} | {r['calls']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
                f"{r['speedup']:.2f}x | {r['tokens_equal']}/{r['tokens']} | {r['tokens'] - r['tokens_equal']} |")
        if flops:
            line += f" {r['flops'] / 1e9:.0f} | {r['flop_ratio']:.2f}x | {r['speedup'] / r['flop_ratio']:.0%} |"
        print(line)


def count_flops(run) -> int:
    """FLOPs of the products and attention one call of `run` dispatches (roofline.Counter)."""
    with Counter() as counter:
        run()
    return counter.flops


def generic_prompt(tok, length: int) -> list[int]:
    """A chat prompt around a repeated Turkish text, its last `length` tokens."""
    text = ("Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu. İstanbul Boğazı "
            "Avrupa ile Asya'yı birbirinden ayırır. ") * 8
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
    return ([tok.bos_id] + ids)[-length:]


def chat_prompts(tok, args) -> list[list[int]]:
    """The SFT prompt ids of the first --num-prompts rows of --chat-data, their last (assistant) turn left out."""
    rows = read_rows(args.chat_data)[: args.num_prompts]  # UserError (one sentence) when empty
    return [chat.chat_prompt_ids(chat.sft_messages(row, "messages")[:-1], tok) for row in rows]


def text_prompts(tok, args) -> list[list[int]]:
    """--num-prompts windows of --prompt-length tokens (after <bos>), evenly spread over --text-data's texts."""
    ids = []
    for row in read_rows(args.text_data):
        if not isinstance(row.get("text"), str):
            raise UserError(f"--text-data {args.text_data}: every row needs a \"text\" string.")
        ids += tok.encode(row["text"], add_special_tokens=False)
    n = args.prompt_length - 1
    if len(ids) < n * args.num_prompts:
        raise UserError(f"--text-data {args.text_data} has {len(ids)} tokens, fewer than "
                        f"{args.num_prompts} prompts of {n}; lower --num-prompts or --prompt-length.")
    stride = (len(ids) - n) // max(args.num_prompts - 1, 1)
    return [[tok.bos_id] + ids[i * stride: i * stride + n] for i in range(args.num_prompts)]


if __name__ == "__main__":
    run_cli(main)
