"""Masked diffusion in one file: build a small ModernBERT, train it on Turkish text with the
NELBO, watch the bound fall, then let the block sampler write. It uses the algorithm modules only;
the equations are in docs/math.md, the sampler in docs/sampler.md, the production loop
(accumulation, DDP, resume) in minidiff/training/trainer.py.

    python docs/walkthrough.py --steps 100              # under a minute on a laptop CPU
    python docs/walkthrough.py --text my_turkish.txt    # your own UTF-8 text instead of walkthrough.txt
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from minidiff import diffusion, optim  # noqa: E402
from minidiff.errors import UserError, run_cli  # noqa: E402
from minidiff.model import ModelConfig, ModernBertMLM  # noqa: E402
from minidiff.sampler import SamplerConfig, generate  # noqa: E402

TEXT = Path(__file__).with_name("walkthrough.txt")  # a few kB of plain Turkish, written for this file
RESERVED_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # mmBERT's first five ids
PAD, EOS, BOS, UNK, MASK = range(5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64, help="characters per training window")
    p.add_argument("--hidden", type=int, default=96, help="hidden size (4 heads of hidden/4)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out bounds")
    p.add_argument("--sample-tokens", type=int, default=48, help="characters the sampler writes")
    p.add_argument("--text", type=Path, default=TEXT, help="the UTF-8 text to train on")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def windows(ids: torch.Tensor, count: int, length: int, generator) -> torch.Tensor:
    """`count` random windows of `length` characters, each framed <bos> ... (as mmBERT's text)."""
    starts = torch.randint(0, len(ids) - length, (count,), generator=generator)  # [count]
    body = torch.stack([ids[s: s + length - 1] for s in starts.tolist()])  # [count, length-1]
    return torch.cat([torch.full((count, 1), BOS), body], dim=1)  # [count, length]


@torch.no_grad()
def held_out_bound(model, x0: torch.Tensor) -> float:
    """NELBO per character on fixed held-out windows (the same masks each time, so values compare):
    E_t E_xt[ w(t) sum_masked -log p(x0_i | x_t) ] / #tokens >= -log p(x0) / #tokens."""
    model.eval()
    draws = [diffusion.nelbo_loss(model, x0, MASK, normalize="token", stratified=True,
                                  generator=torch.Generator().manual_seed(k))[0] for k in range(4)]
    model.train()
    return torch.stack(draws).mean().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.text.is_file():
        raise UserError(f"--text {args.text}: no such file; expected a UTF-8 text file")
    text = args.text.read_text(encoding="utf-8")
    if len(text) < 4 * args.seq_len:
        raise UserError(f"the text has {len(text)} characters; expected at least 4 x --seq-len")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # matrices this small: extra threads wait on one another, worst on a busy machine

    # 1. A character-level vocabulary after mmBERT's five special tokens.
    itos = RESERVED_TOKENS + sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    ids = torch.tensor([stoi[c] for c in text])
    train_ids, held_ids = ids[: int(0.9 * len(ids))], ids[int(0.9 * len(ids)):]

    # 2. A small ModernBERT: alternating local (window 16) and global attention, tied decoder.
    config = ModelConfig(vocab_size=len(itos), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, max_position_embeddings=args.seq_len,
                         local_attention=16, global_attn_every_n_layers=2, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=BOS, cls_token_id=BOS, sep_token_id=EOS, mask_token_id=MASK)
    model = ModernBertMLM(config).train()
    print(f"model: {model.num_parameters():,} parameters, vocabulary {len(itos)} "
          f"(uniform guess: {math.log(len(itos) - len(RESERVED_TOKENS)):.3f} nats/char)")

    # 3. AdamW (decay on matrices only) with warmup then cosine decay of the learning rate.
    opt = optim.AdamW(optim.param_groups(model, weight_decay=0.01), lr=args.lr, betas=(0.9, 0.98))
    lr_schedule = optim.WarmupCosine(opt, warmup=args.steps // 20, total=args.steps)
    data_gen = torch.Generator().manual_seed(args.seed)
    held_out = windows(held_ids, 16, args.seq_len, torch.Generator().manual_seed(1234))  # fixed

    # 4. The loop. One step: draw t per sequence, mask each token with probability 1 - alpha(t),
    #    predict the masked tokens, weight the cross-entropy by -alpha'(t)/(1 - alpha(t)) = 1/t.
    print(f"step 0: held-out NELBO bound {held_out_bound(model, held_out):.3f} nats/char")
    for step in range(1, args.steps + 1):
        x0 = windows(train_ids, args.batch_size, args.seq_len, data_gen)  # [B, S]
        loss, _ = diffusion.nelbo_loss(model, x0, MASK, normalize="token", generator=data_gen)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f}, "
                  f"held-out NELBO bound {held_out_bound(model, held_out):.3f} nats/char")

    # 5. Sampling: [<bos> prompt | masks], unmasked block by block, most confident first.
    model.eval()
    prompt = "Türkiye"
    prompt_ids = [BOS] + [stoi.get(c, UNK) for c in prompt]
    sampler = SamplerConfig(max_new_tokens=args.sample_tokens, steps=args.sample_tokens, block_length=16,
                            repetition_penalty=1.2)
    out = generate(model, [prompt_ids], sampler, mask_id=MASK, eos_id=EOS)
    answer = out.sequences[0, len(prompt_ids):].tolist()  # [max_new_tokens]
    written = "".join(itos[i] for i in answer if i >= len(RESERVED_TOKENS))
    print(f"sampled {len(answer)} tokens ({len(written)} characters) in {out.num_forward} model calls:")
    print(prompt + written)


if __name__ == "__main__":
    run_cli(main)
