"""Scoring many (prompt, answer) pairs: log p(answer | prompt), the rows of all pairs in shared forwards.

References: LLaDA (arXiv 2502.09992: the l/L estimator); docs/math.md, section 4. The likelihoods are
minidiff.diffusion's; this module packs each pair's 2^L - 1 exact or num_samples Monte-Carlo rows into
right-padded forwards of batch_size rows. A pair's own seed makes its value independent of the rest.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch

from minidiff import diffusion
from minidiff.errors import UserError
from minidiff.model import model_device
from minidiff.speed.chunked_loss import masked_ce_per_row

SCORINGS = ("auto", "exact", "mc")


@dataclass(frozen=True)
class AnswerScore:
    """loglik ~ log p(answer | prompt), se its Monte-Carlo standard error (0 exact, nan from one sample)."""

    loglik: float
    se: float
    exact: bool


def item_seed(seed: int, *item: str | int) -> int:
    """The seed of an item's random stream (the item named by its text, e.g. its prompt), the same everywhere."""
    digest = hashlib.blake2b(json.dumps([seed, *item]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def answer_sequence(prompt_ids, answer_ids):
    """(prompt + answer ids [S] long, L): the sequence whose last L tokens are the answer scored."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
    if answer.numel() == 0:
        raise UserError("an answer to score is empty; expected at least one answer token")
    return torch.cat([prompt, answer]), answer.numel()


def stratum_offset(L: int, generator=None) -> torch.Tensor:
    """k ~ U{0 .. L-1} [1], drawn once per answer before its masks, as diffusion.mc_loglik draws it."""
    return torch.randint(L, (1,), generator=generator, device=generator.device if generator is not None else "cpu")


def use_exact(L: int, scoring: str, num_samples: int) -> bool:
    """exact: always; mc: only L = 1 (one row); auto: when 2^L - 1 rows are no more than num_samples."""
    if scoring not in SCORINGS:
        raise UserError(f"scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
    if scoring == "exact":
        if L > diffusion.MAX_EXACT_LENGTH:
            raise UserError(f"exact scoring enumerates 2^L - 1 masks and accepts answers of at most "
                            f"{diffusion.MAX_EXACT_LENGTH} tokens; one has {L} (use scoring auto or mc)")
        return True
    return L == 1 or (scoring == "auto" and 2**L - 1 <= num_samples)


def _pack_rows(pieces, pad_id: int, device):
    """Pieces (sequence [S_p], answer masks [c_p, L_p]) -> x0, is_masked, attention [b, W] (right-padded), padded?"""
    lengths = [seq.numel() for seq, _ in pieces]
    width, b = max(lengths), sum(masks.shape[0] for _, masks in pieces)
    x0 = torch.full((b, width), pad_id, dtype=torch.long, device=device)  # [b, W]
    is_masked = torch.zeros(b, width, dtype=torch.bool, device=device)  # [b, W]
    attention = torch.zeros(b, width, dtype=torch.long, device=device)  # [b, W]
    r0 = 0
    for seq, masks in pieces:
        r1, end = r0 + masks.shape[0], seq.numel()
        x0[r0:r1, :end] = seq
        attention[r0:r1, :end] = 1
        is_masked[r0:r1, end - masks.shape[1]:end] = masks.to(device)
        r0 = r1
    return x0, is_masked, attention, min(lengths) != width


def _row_sources(pairs, exact, num_samples: int, generator, seeds, device):
    """Per pair, lazily in pair order: (sequence [S], rows(range) -> (answer masks [c, L], weights [c]))."""
    for p, ((prompt, answer), enumerate_all) in enumerate(zip(pairs, exact)):
        sequence, L = answer_sequence(prompt, answer)
        if enumerate_all:
            yield sequence.to(device), partial(diffusion.all_masks, L)
            continue
        if seeds is not None:
            generator = torch.Generator().manual_seed(seeds[p])
        offset = stratum_offset(L, generator)
        yield sequence.to(device), partial(diffusion.draw_answer_masks, L, num_samples, offset, generator=generator)


def _row_batches(sources, rows, batch_size: int):
    """Forwards of at most batch_size rows, pair after pair: [(pair, sequence [S], masks [c, L], weights [c])]."""
    batch, room = [], batch_size
    for p, (sequence, rows_of) in enumerate(sources):
        taken = 0
        while taken < rows[p]:
            count = min(room, rows[p] - taken)
            masks, weights = rows_of(range(taken, taken + count))
            batch.append((p, sequence, masks, weights))
            taken, room = taken + count, room - count
            if room == 0:
                yield batch
                batch, room = [], batch_size
    if batch:
        yield batch


@torch.no_grad()
def score_answers(model, pairs, mask_id: int, *, pad_id: int, num_samples: int = diffusion.DEFAULT_MC_SAMPLES,
                  batch_size: int = 32, scoring: str = "mc", generator=None,
                  seeds: Sequence[int] | None = None) -> list[AnswerScore]:
    """diffusion.exact_nelbo or .mc_loglik of each (prompt, answer) pair; pair p draws from `generator` or seeds[p]."""
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"num_samples={num_samples} and batch_size={batch_size} must both be >= 1")
    if seeds is not None and len(seeds) != len(pairs):
        raise ValueError(f"{len(seeds)} seeds for {len(pairs)} pairs; expected one seed per pair")
    if len(pairs) == 0:
        return []
    device = model_device(model)
    lengths = [answer_sequence(prompt, answer)[1] for prompt, answer in pairs]
    exact = [use_exact(L, scoring, num_samples) for L in lengths]
    rows = [2**L - 1 if flag else num_samples for L, flag in zip(lengths, exact)]
    sources = _row_sources(pairs, exact, num_samples, generator, seeds, device)
    sums = torch.zeros(2, len(pairs), dtype=torch.float64, device=device)  # [2, P]: sum v, sum v^2
    for batch in _row_batches(sources, rows, batch_size):
        x0, is_masked, attention, padded = _pack_rows([(seq, masks) for _, seq, masks, _ in batch], pad_id, device)
        owners = torch.cat([torch.full((m.shape[0],), p, device=device) for p, _, m, _ in batch])  # [b]
        weights = torch.cat([w for *_, w in batch]).to(device)  # [b]
        # v = weight * sum_{i in M} CE_i per row
        values = weights * masked_ce_per_row(model, x0, is_masked, mask_id, attention if padded else None)
        sums.index_add_(1, owners, torch.stack([values, values * values]))
    n = torch.tensor(rows, dtype=torch.float64, device=device)  # [P]
    is_exact = torch.tensor(exact, device=device)  # [P]
    # exact: -sum_M weight_M CE_M; Monte Carlo: -(1/n) sum_j v_j
    loglik = -torch.where(is_exact, sums[0], sums[0] / n)
    # sample variance of v: (sum v^2 - n mean^2) / (n - 1); se = sqrt(var / n)
    mean = sums[0] / n
    var = ((sums[1] - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    # exact: 0; a single sample: unknown (nan)
    se = torch.where(is_exact, torch.zeros_like(var), torch.where(n < 2, math.nan, (var / n).sqrt()))
    # one host read for all pairs
    return [AnswerScore(value, error, flag) for value, error, flag in zip(loglik.tolist(), se.tolist(), exact)]


def mc_loglik_many(model, pairs, mask_id: int, *, pad_id: int, num_samples: int = diffusion.DEFAULT_MC_SAMPLES,
                   batch_size: int = 32, generator=None, seeds: Sequence[int] | None = None) -> list[float]:
    """diffusion.mc_loglik for each pair (`score_answers` with scoring="mc", values only)."""
    scores = score_answers(model, pairs, mask_id, pad_id=pad_id, num_samples=num_samples,
                           batch_size=batch_size, scoring="mc", generator=generator, seeds=seeds)
    return [score.loglik for score in scores]
