"""minidiff vs transformers forward speed on the same weights (CPU by default), in one run.

References: ModernBERT (arXiv 2412.13663); the reference is transformers' `ModernBertForMaskedLM`.
Findings: docs/benchmarks.md ("Forward pass at mmBERT-base shape").

    python benchmarks/bench_forward.py                      # mmBERT-small depth/width, vocab 32k, 4 x 512
    python benchmarks/bench_forward.py --vocab 256000 --batch 1   # the real vocabulary width
    python benchmarks/bench_forward.py --base --batch 1 --threads 1  # mmBERT-base: hidden 768, 12 heads, vocab 256k
    python benchmarks/bench_forward.py --json forward.json  # the table as JSON too

Medians of interleaved repeats after a warm-up; speed-up = transformers' dense time / the variant's,
for dense logits [B, S, V] and for `logits_at` on --frac of the positions.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import transformers
from common import MMBERT_BASE, banner, interleaved, mmbert_base, parse, table_head, write_results

from minidiff.model import ModernBertMLM


def transformers_twin(ours: ModernBertMLM, attn: str = "sdpa") -> transformers.ModernBertForMaskedLM:
    """transformers' ModernBertForMaskedLM with `ours`'s config and weights (the decoder tied)."""
    hf_config = transformers.ModernBertConfig(**ours.config.to_dict())
    hf_config._attn_implementation = attn
    hf = transformers.ModernBertForMaskedLM(hf_config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"decoder.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000; --base: 256000)")
    parser.add_argument("--base", action="store_true", help="mmBERT-base's width: hidden 768, 12 heads")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--frac", type=float, default=0.15, help="fraction of positions for logits_at")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    parser.add_argument("--padding", action="store_true", help="right-pad rows to 100%%, 90%%, 75%%, ... of seq")
    args = parse(parser)
    args.vocab = args.vocab or (MMBERT_BASE["vocab_size"] if args.base else 32000)
    small = {} if args.base else {"hidden_size": 384, "num_attention_heads": 6}  # mmBERT-small's width
    torch.manual_seed(0)
    ours = ModernBertMLM(mmbert_base(vocab_size=args.vocab, **small)).eval()
    hf = transformers_twin(ours, args.attn).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones_like(ids)
    if args.padding:
        for b in range(args.batch):
            attention_mask[b, int(args.seq * (1 - 0.1 * b)):] = 0
    ids = ids.masked_fill(attention_mask == 0, 0)
    sel = (torch.rand(ids.shape, generator=g) < args.frac) & attention_mask.bool()

    variants = {
        "transformers dense": lambda: hf(input_ids=ids, attention_mask=attention_mask).logits,
        "minidiff dense": lambda: ours(ids, attention_mask),
        "minidiff logits_at": lambda: ours(ids, attention_mask, logits_at=sel),
    }
    with torch.no_grad():
        # correctness first (same numbers, fp32): also the warm-up
        want = variants["transformers dense"]()
        diff = (variants["minidiff dense"]() - want)[attention_mask.bool()].abs().max().item()
        diff_at = (variants["minidiff logits_at"]() - want[sel]).abs().max().item()
        del want
        times = interleaved(variants, args.repeats, warmup=0)  # each output freed before the next variant runs
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"variant": name, "median_s": med[name], "min_s": min(times[name]),
             "speedup": med["transformers dense"] / med[name]} for name in variants]
    print(f"\nforward, no grad, fp32: B={args.batch} S={args.seq} V={args.vocab}, "
          f"{'mmBERT-base' if args.base else 'mmBERT-small'} layers, "
          f"transformers attn={args.attn}, padding={'yes' if args.padding else 'no'}; "
          f"logits_at on {sel.sum().item()} of {ids.numel()} positions; max |diff| dense {diff:.1e}, "
          f"logits_at {diff_at:.1e}; median of {args.repeats} interleaved repeats\n{banner()}\n")
    print(table_head("variant", "median s", "min s", "speed-up vs transformers dense"))
    for row in rows:
        print(f"| {row['variant']} | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['speedup']:.2f}x |")
    write_results(args.json, {"settings": {k: getattr(args, k) for k in (
        "base", "vocab", "batch", "seq", "frac", "repeats", "attn", "padding")},
        "max_abs_diff": {"dense": diff, "logits_at": diff_at}, "rows": rows})


if __name__ == "__main__":
    main()
