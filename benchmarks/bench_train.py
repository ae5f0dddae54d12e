"""One LoRA CPT training step: minidiff against transformers + peft + torch.optim.AdamW, same model.

References: LoRA (arXiv 2106.09685), AdamW (1711.05101), MDLM (2406.07524). Findings:
docs/benchmarks.md ("Training step").

    python benchmarks/bench_train.py                       # mmBERT-shaped, 2 layers, vocab 256000
    python benchmarks/bench_train.py --layers 4 --seq 512 --batch 2 --steps 5
    python benchmarks/bench_train.py --json train.json     # the table as JSON too

The same weights, LoRA adapters, batch and masks on both sides, fp32 on the CPU; the reference
computes dense logits [B, S, V]. Steps alternate between the two; the median is reported.
"""
from __future__ import annotations

import argparse
import itertools
import statistics

import peft
import torch
import torch.nn.functional as F
from bench_forward import transformers_twin
from common import MMBERT_BASE, banner, interleaved, mmbert_base, parse, table_head, write_results

from minidiff import diffusion, lora, optim
from minidiff.model import ModernBertMLM
from minidiff.speed import chunked_loss

MASK_ID = MMBERT_BASE["mask_token_id"]


def build(args):
    torch.manual_seed(0)
    ours = ModernBertMLM(mmbert_base(vocab_size=args.vocab, num_hidden_layers=args.layers))
    ref = transformers_twin(ours)
    targets = ["Wqkv", "Wo", "Wi"]
    torch.manual_seed(1)
    lora.apply_lora(ours, r=args.rank, alpha=args.rank, dropout=0.05, targets=targets)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.05,
                                                   target_modules=targets))
    # same adapter initialisation on both sides (B = 0, A copied)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                ref_params[f"base_model.model.{name.replace('.weight', '.default.weight')}"].copy_(p)
    ours_opt = optim.AdamW(optim.param_groups(ours, 0.0), lr=1e-4, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    return ours, ours_opt, ref, ref_opt


def ours_step(model, opt, x0, seed):
    gen = torch.Generator().manual_seed(seed)
    loss, _ = chunked_loss.nelbo_loss(model, x0, MASK_ID, generator=gen)  # the trainer's loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def ref_loss(model, x0, seed):
    gen = torch.Generator().manual_seed(seed)
    t = diffusion.sample_t(x0.shape[0], 1e-3, False, gen)  # the same draws nelbo_loss makes
    xt, masked = diffusion.corrupt(x0, t, MASK_ID, None, gen)
    logits = model(input_ids=xt).logits  # [B, S, V]: dense, as a transformers training loop computes it
    logits = logits.masked_fill(torch.arange(logits.shape[-1]) == MASK_ID, float("-inf"))
    ce = F.cross_entropy(logits[masked], x0[masked], reduction="none")  # [N]
    rows = masked.nonzero()[:, 0]
    # per sequence: sum_masked CE / t / S, then the batch mean (normalize="sequence", linear schedule)
    per_row = torch.zeros(x0.shape[0]).index_add_(0, rows, ce / t[rows])
    return (per_row / x0.shape[1]).mean()


def ref_step(model, opt, x0, seed):
    loss = ref_loss(model, x0, seed)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=MMBERT_BASE["vocab_size"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parse(parser, threads=2)
    ours, ours_opt, ref, ref_opt = build(args)
    x0 = torch.randint(5, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))

    # parity (dropout off): the two losses of the same batch and masks agree
    ours.eval(), ref.eval()
    with torch.no_grad():
        a = chunked_loss.nelbo_loss(ours, x0, MASK_ID, generator=torch.Generator().manual_seed(9))[0]
        b = ref_loss(ref, x0, 9)
    ours.train(), ref.train()
    seeds = {name: itertools.count(100) for name in ("minidiff", "transformers+peft")}  # round i: seed 100 + i
    times = interleaved({"minidiff": lambda: ours_step(ours, ours_opt, x0, next(seeds["minidiff"])),
                         "transformers+peft": lambda: ref_step(ref, ref_opt, x0, next(seeds["transformers+peft"]))},
                        args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"implementation": name, "seconds_per_step": median[name],
             "tokens_per_s": args.batch * args.seq / median[name],
             "speedup": median["transformers+peft"] / median[name]} for name in ("transformers+peft", "minidiff")]
    print(f"LoRA CPT step, hidden 768, {args.layers} layers, vocab {args.vocab:,}, batch {args.batch} x {args.seq}, "
          f"r={args.rank}, fp32 CPU, median of {args.steps} steps\n{banner()}")
    print(f"loss parity (dropout off): minidiff {a.item():.6f} vs reference {b.item():.6f}\n")
    print(table_head("implementation", "s / step", "tokens / s", "speed-up"))
    for row in rows:
        print(f"| {row['implementation']} | {row['seconds_per_step']:.3f} | {row['tokens_per_s']:,.0f} | "
              f"{row['speedup']:.2f}x |")
    write_results(args.json, {"settings": {k: getattr(args, k) for k in ("vocab", "layers", "seq", "batch", "rank",
                                                                         "steps")},
                              "loss_parity": {"minidiff": a.item(), "reference": b.item()}, "rows": rows})


if __name__ == "__main__":
    main()
