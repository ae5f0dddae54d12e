"""What computes the fast sampler's logits at each step of a block: the model on the whole canvas
(exact), or Fast-dLLM's approximate key/value caches (prefix, dual).
References: Fast-dLLM (arXiv 2505.22618; NVlabs/Fast-dLLM, ported as dllm's `fastdllm` pipeline).
Every source maps (ids [B, T], attention_mask, positions [B, N]) to the logits there [B, N, V]:

    cache "none":      every step: the model on the whole canvas (`model.logits_at_positions`)
    step 0 (refresh):  the full canvas forward fills a KVCache; its logits at the block are used
    step i, "dual":    the encoder runs on the block's K positions only; their queries attend
                       to cached keys/values outside the block, fresh ones inside
    step i, "prefix":  the encoder runs on the block and everything after it
    (cache_refresh = n refills the cache every n steps; n = 1 is the exact sampler again)

A refresh writes the cache, so it runs eagerly even under torch.compile. Keys/values outside the
window are the last refresh's: approximate (docs/sampler.md, "Key/value caches").
"""
from __future__ import annotations

import torch

from minidiff.model import KVCache


class CachedLogits:
    """A logits source served from a KVCache, filling it (`fill`) or reading it. `block` [B, K]: the
    block's canvas positions (consecutive per row); `window`: prefix mode's recomputed positions."""

    def __init__(self, model, cache: KVCache, mode: str, fill: bool, window: int, block: torch.Tensor):
        self.model, self.cache, self.mode, self.fill, self.window, self.block = model, cache, mode, fill, window, block

    def __call__(self, ids, attention_mask, positions):
        if self.fill:
            h, start = self.model.hidden(ids, attention_mask, cache=self.cache), 0  # [B, T, H]
        else:
            block = self.block.repeat(positions.shape[0] // self.block.shape[0], 1)  # cfg: [2B, K]
            start = block[:, :1]  # [B, 1]
            if self.mode == "dual":
                recomputed = block  # [B, K]
            else:  # the block's first position onwards; past the canvas end = unused slots
                recomputed = start + torch.arange(self.window, device=start.device)[None, :]  # [B, W]
            inputs = ids.gather(1, recomputed.clamp(max=ids.shape[1] - 1))  # [B, Q]
            h = self.model.hidden(inputs, attention_mask, cache=self.cache.at(recomputed))  # [B, Q, H]
        h = h.gather(1, (positions - start)[..., None].expand(-1, -1, h.shape[-1]))  # [B, N, H]
        return self.model.logits_from_hidden(h)  # [B, N, V]


class BlockLogits:
    """The logits source of every step of one block [B, K], and which steps refresh the cache."""

    def __init__(self, model, config, block: torch.Tensor, canvas_length: int):
        self.model, self.mode, self.refresh_every = model, config.cache, config.cache_refresh
        if self.mode == "none":
            return
        if not hasattr(model, "logits_from_hidden"):
            raise TypeError("cached sampling needs a minidiff ModernBertMLM (hidden + logits_from_hidden)")
        # prefix: the block and what follows, for the row that starts first
        window = canvas_length - int(block[:, 0].min()) if self.mode == "prefix" else 0
        cache = KVCache()
        self.filling = CachedLogits(model, cache, self.mode, True, window, block)
        self.reading = CachedLogits(model, cache, self.mode, False, window, block)

    def refreshes(self, i: int) -> bool:
        """Does step i refill the cache?"""
        every = self.refresh_every
        return self.mode != "none" and (i == 0 or (every is not None and i % every == 0))

    def at_step(self, i: int):
        """The source of step i: (ids [B, T], attention_mask, positions [B, N]) -> [B, N, V]."""
        if self.mode == "none":
            return self.model.logits_at_positions
        return self.filling if self.refreshes(i) else self.reading
