"""Batch invariance: which rows may share one canvas so that each row's answer is, bit for bit, the
answer it gets alone. A row padded with masked keys gets logits that move in the last place when
the padding changes (the CPU's attention kernel splits its sums by the number of keys), and near-ties
flip. So every canvas is padded to a multiple of a length bucket, alone as in a batch, and only rows
of one padded length share it (`share_keys`); a seeded row with random draws runs alone, and so does
a row whose products' row counts could change its rounding. `speed.sampling.generate` and the
server (serving/batch.py) use it. Reader's page: docs/serving.md ("Batch invariance").
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.sampler import Canvas, SamplerConfig
from minidiff.speed.packed import PackedLinear

# MKL's fp32 product (unpacked weights) may round a row differently in a product of few rows unless
# their count is a multiple of this (measured: docs/serving.md, "Batch invariance")
PRODUCT_ROWS = 4


def padded_length(tokens: int, bucket: int) -> int:
    """A canvas of `tokens` positions rounded up to a multiple of `bucket` (0: as it is)."""
    return -(-tokens // bucket) * bucket if bucket else tokens


def exact_products(model: nn.Module) -> bool:
    """Does every linear layer round a row alike whatever the row count? Packed (oneDNN) ones do."""
    return all(isinstance(m, PackedLinear) and m.packed_weight() is not None
               for m in model.modules() if isinstance(m, nn.Linear))


def products_alike(row_counts, exact: bool) -> bool:
    """Are a row's products rounded as alone, in products of these many rows per row?"""
    return exact or all(m % PRODUCT_ROWS == 0 for m in row_counts)


def own_draws(config: SamplerConfig) -> bool:
    """Does a row need its own random generators (a seed, and draws that follow it)?"""
    draws = config.temperature > 0 or config.remasking == "random" or config.stochastic
    return draws and config.seed is not None


def row_key(tokens: int, starts: list[int], widths: list[int], bucket: int, exact: bool, prefix: bool) -> tuple:
    """What a row of `tokens` positions, whose blocks start at `starts` and are `widths` wide, must
    share with the rows beside it to be computed as alone: (its padded length, prefix mode's block
    starts or None, whether it must run alone: its products' row counts per row, the canvas, the
    blocks and prefix mode's windows, could round it apart)."""
    length = padded_length(tokens, bucket)
    windows = [length - start for start in starts] if prefix else []
    return length, tuple(starts) if prefix else None, not products_alike([length, *widths, *windows], exact)


def share_keys(canvas: Canvas, config: SamplerConfig, bucket: int, exact: bool, prefix: bool) -> list[tuple]:
    """Per row of the canvas: rows with equal keys may be denoised on one canvas padded to `bucket`,
    each as alone (`row_key`; a row with its own draws alone too: the key holds its index)."""
    if not bucket:
        return [()] * canvas.ids.shape[0]  # one canvas padded to the longest: equal alone up to rounding
    starts = torch.stack([block[:, 0] for block in canvas.blocks], 1).tolist()  # [B, blocks]
    widths = [block.shape[1] for block in canvas.blocks]
    keys = []
    for r, tokens in enumerate(canvas.answer_end):
        length, window, alone = row_key(tokens, starts[r], widths, bucket, exact, prefix)
        keys.append((length, window, r if alone or own_draws(config) else None))
    return keys


def pad_to_bucket(canvas: Canvas, bucket: int) -> Canvas:
    """The canvas eos-padded to a multiple of `bucket` with an attention mask, alone as in any batch,
    so that a row sees the same padding and mask kernel wherever it runs (bucket 0 or 1: as it is)."""
    if bucket <= 1:
        return canvas
    device = canvas.ids.device
    extra = max(padded_length(n, bucket) for n in canvas.answer_end) - canvas.ids.shape[1]
    ids = F.pad(canvas.ids, (0, extra), value=canvas.eos_id)  # [B, T'], T' a multiple of bucket
    lengths = torch.tensor(canvas.answer_end, device=device)[:, None]  # [B, 1]
    own = (torch.arange(ids.shape[1], device=device)[None, :] < lengths).long()  # [B, T']
    return replace(canvas, ids=ids, attention_mask=own, given=F.pad(canvas.given.long(), (0, extra)).bool())
