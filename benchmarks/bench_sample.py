"""Sampling speed: minidiff.sampler.generate vs a reference with full-canvas logits, and threshold decoding.

    python benchmarks/bench_sample.py                    # random mmBERT-shaped model (768 hidden, 256k vocab, 2 layers)
    python benchmarks/bench_sample.py --layers 4 --max-new-tokens 64
    python benchmarks/bench_sample.py --model DIR        # a trained model (e.g. the demo's) and its tokenizer

The reference is the dllm / Diffutron step written plainly: the MLM head and the 256k-way
vocabulary projection run on every canvas position every step, the repetition penalty loops over
rows, top-k per row. Both use the diffutron-long settings (128 tokens, 128 steps, block 32,
penalty 1.2) at temperature 0, so they must commit identical tokens (asserted). Threshold decoding
(0.9) is reported with its agreement with the reference. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidiff.model import ModelConfig, ModernBertMLM  # noqa: E402
from minidiff.sampler import SamplerConfig, generate, transfer_counts  # noqa: E402


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
        for k in transfer_counts(m, steps, config.schedule):
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


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a trained model directory (with tokenizer); default: random mmBERT-shaped")
    p.add_argument("--layers", type=int, default=2, help="layers of the random model (mmBERT-base: 22)")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the three samplers this many times, interleaved, and keep each one's fastest")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        import minidiff

        model = minidiff.load_model(args.model)
        tok = minidiff.load_tokenizer(args.model)
        mask_id, eos_id = tok.mask_id, tok.eos_id
        text = ("Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu. İstanbul Boğazı "
                "Avrupa ile Asya'yı birbirinden ayırır. ") * 8
        question = tok.apply_chat_template([{"role": "user", "content": text}])
        ids = tok.encode(question, add_special_tokens=False)
        prompt = ([tok.bos_id] + ids)[-args.prompt_length:]
        what = f"{args.model} ({model.num_parameters():,} parameters)"
    else:
        torch.manual_seed(args.seed)
        config = ModelConfig(vocab_size=256000, hidden_size=768, intermediate_size=1152,
                             num_hidden_layers=args.layers, num_attention_heads=12,
                             max_position_embeddings=8192, global_rope_theta=160000.0,
                             local_rope_theta=160000.0, local_attention=128,
                             global_attn_every_n_layers=3, pad_token_id=0, eos_token_id=1,
                             bos_token_id=2, cls_token_id=1, sep_token_id=1, mask_token_id=4)
        model = ModernBertMLM(config).eval()
        mask_id, eos_id = 4, 1
        g = torch.Generator().manual_seed(args.seed)
        prompt = [2] + torch.randint(5, 256000, (args.prompt_length - 1,), generator=g).tolist()
        what = f"random mmBERT-shaped, {args.layers} layers ({model.num_parameters():,} parameters)"

    config = SamplerConfig.preset("diffutron-long", temperature=0.0, stop_strings=(), stop_at_eos=False,
                                  max_new_tokens=args.max_new_tokens, steps=args.max_new_tokens)
    n = config.max_new_tokens
    generate(model, [prompt], config.replace(max_new_tokens=4, steps=4), mask_id=mask_id, eos_id=eos_id)  # warm-up

    t_ref = t_fast = t_thr = math.inf
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits all three
        (ref, ref_calls), t = timed(lambda: reference_generate(model, prompt, config, mask_id, eos_id))
        t_ref = min(t_ref, t)
        fast, t = timed(lambda: generate(model, [prompt], config, mask_id=mask_id, eos_id=eos_id))
        t_fast = min(t_fast, t)
        thr, t = timed(lambda: generate(model, [prompt], config.replace(threshold=args.threshold),
                                        mask_id=mask_id, eos_id=eos_id))
        t_thr = min(t_thr, t)
    answer = slice(len(prompt), len(prompt) + n)
    identical = torch.equal(fast.sequences, ref)
    assert identical, "generate and the reference committed different tokens"
    agree = (thr.sequences[0, answer] == ref[0, answer]).sum().item()

    print(f"\nSampling, {what}; prompt {len(prompt)} tokens, {n} new tokens, diffutron-long "
          f"(block 32, penalty 1.2), temperature 0, batch 1, fastest of {args.repeats} run(s)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| sampler | model calls | seconds | tokens/s | speed-up | tokens equal to reference |")
    print("|---|---|---|---|---|---|")
    print(f"| reference (full-canvas logits) | {ref_calls} | {t_ref:.1f} | {n / t_ref:.2f} | 1.00x | {n}/{n} |")
    print(f"| generate (block logits only) | {fast.num_forward} | {t_fast:.1f} | {n / t_fast:.2f} | "
          f"{t_ref / t_fast:.2f}x | {n}/{n} (identical: {identical}) |")
    print(f"| generate, threshold {args.threshold} | {thr.num_forward} | {t_thr:.1f} | {n / t_thr:.2f} | "
          f"{t_ref / t_thr:.2f}x | {agree}/{n} |")
    if not args.model:
        print("\nA random model is rarely confident, so threshold decoding commits about one token per "
              "step here; its speed-up shows on a trained model (--model DIR).")


if __name__ == "__main__":
    main()
