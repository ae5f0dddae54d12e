"""The paper's MLM perplexity probe, and beside it the NELBO bound on the same blocks.

References: Diffutron (arXiv 2603.20466, Table 4), BERT (1810.04805: the 80/10/10 masking), HF
transformers' `run_mlm.py` (blocks and masking). Derivation: docs/math.md, section 5.

    perplexity = exp( sum_{masked i} -log p(x_i | corrupted block) / #masked )   15% of each block
    (the softmax without the <mask> column, as in every training loss)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from minidiff.errors import UserError
from minidiff.model import model_device
from minidiff.plumbing.progress import bar as progress_bar
from minidiff.speed import chunked_loss


def mlm_corrupt(ids, mask_id: int, maskable, *, mask_prob: float = 0.15, replace: bool = False,
                vocab_size: int | None = None, generator=None):
    """BERT's fixed-ratio masking: (corrupted ids, is_target) [B, S]; replace: 80/10/10, else all <mask>."""
    if not 0.0 <= mask_prob <= 1.0:
        raise UserError(f"mask_prob={mask_prob} is outside [0, 1]")
    if replace and vocab_size is None:
        raise ValueError("mlm_corrupt(replace=True) needs vocab_size for the random 10%")
    maskable = maskable.bool()
    # k_b = floor(p * n_b + 0.5)   (float64 so that p * n lands where a reader computes it)
    count = torch.floor(maskable.sum(1).double() * mask_prob + 0.5).long()  # [B]
    # rank the maskable positions by a uniform score; non-maskable ones (score 2) rank last
    scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~maskable, 2.0)  # [B, S]
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, S] rank of each position in its row
    is_target = ranks < count[:, None]  # [B, S]
    if not replace:
        return torch.where(is_target, torch.full_like(ids, mask_id), ids), is_target
    choice = torch.rand(ids.shape, generator=generator, device=ids.device)  # [B, S]
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    # u < 0.8 -> <mask>;  0.8 <= u < 0.9 -> random token;  u >= 0.9 -> unchanged
    corrupted = torch.where(is_target & (choice < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(is_target & (choice >= 0.8) & (choice < 0.9), random_ids, corrupted)
    return corrupted, is_target


def perplexity_blocks(texts: Sequence[str], tok, max_len: int = 512) -> torch.Tensor:
    """The framed documents, concatenated, in [N, max_len] blocks; a shorter tail is dropped (run_mlm)."""
    ids = [i for text in texts for i in tok.encode(text, add_special_tokens=True)]
    if not ids:
        raise UserError("the perplexity source holds no tokens")
    usable = (len(ids) // max_len) * max_len if len(ids) >= max_len else len(ids)
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, min(max_len, usable))  # [N, S]


def mask_blocks(blocks: torch.Tensor, tok, *, mask_prob: float = 0.15, replace: bool = False,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(corrupted, is_target, maskable): mlm_corrupt of the non-special tokens, on the CPU (the seed alone)."""
    special = torch.tensor(sorted(tok.special_ids), dtype=torch.long)
    maskable = ~torch.isin(blocks, special)  # [N, S]
    corrupted, is_target = mlm_corrupt(blocks, tok.mask_id, maskable, mask_prob=mask_prob, replace=replace,
                                       vocab_size=tok.vocab_size, generator=torch.Generator().manual_seed(seed))
    return corrupted, is_target, maskable


@torch.no_grad()
def mlm_perplexity(model, tok, texts: Sequence[str], *, max_len: int = 512, mask_prob: float = 0.15,
                   replace: bool = False, seed: int = 0, batch_size: int = 8, nelbo: bool = True,
                   progress: bool = True) -> dict:
    """The paper's probe, exp(mean CE at the masked positions), and exp(NELBO / non-special tokens)."""
    device = model_device(model)
    blocks = perplexity_blocks(texts, tok, max_len)
    corrupted, is_target, maskable = mask_blocks(blocks, tok, mask_prob=mask_prob, replace=replace, seed=seed)
    nelbo_gen = torch.Generator(device=device).manual_seed(seed + 1)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    nelbo_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in progress_bar(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
        rows = slice(start, start + batch_size)
        x0, xt, target, keep = (t[rows].to(device) for t in (blocks, corrupted, is_target, maskable))
        # sum_i CE_i, CE_i = -log softmax(logits_i)[x0_i] at the masked positions, <mask> column out
        batch_ce, _ = chunked_loss.decoder_cross_entropy(model, xt, target, x0, torch.ones((), dtype=torch.float64),
                                                         excluded_id=tok.mask_id)
        ce_sum += batch_ce.double()
        if nelbo:
            loss, _ = chunked_loss.nelbo_loss(model, x0, tok.mask_id, maskable=keep, schedule="linear",
                                              normalize="token", generator=nelbo_gen)
            # token-normalised loss x this batch's non-special tokens = the batch's NELBO sum
            nelbo_sum += loss.double() * keep.sum()
    n_masked, n_tokens = int(is_target.sum()), int(maskable.sum())
    if n_masked == 0:
        raise UserError(f"the perplexity source has only {n_tokens} non-special tokens; "
                        f"masking {mask_prob:.0%} of them leaves nothing to score")
    out = {"perplexity": math.exp(ce_sum.item() / n_masked), "n_masked": n_masked,
           "n_tokens": n_tokens, "n_blocks": len(blocks), "block_len": blocks.shape[1]}
    if nelbo:
        out["nelbo_perplexity"] = math.exp(nelbo_sum.item() / n_tokens)
    return out
