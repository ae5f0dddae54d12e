"""Fast-dLLM's approximate key/value caches (prefix, dual) as a source of the fast sampler's logits.
References: Fast-dLLM (arXiv 2505.22618; NVlabs/Fast-dLLM, ported as dllm's `fastdllm` pipeline).
Every source maps (ids [B, T], attention_mask, positions [B, N]) to the logits there [B, N, V]:

    cache "none":      every step: the model on the whole canvas (`model.logits_at_positions`)
    step 0 (refresh):  the full canvas forward fills a KVCache; its logits at the block are used
    step i, "dual":    the encoder runs on the block's K positions only; their queries attend
                       to cached keys/values outside the block, fresh ones inside
    step i, "prefix":  the encoder runs on the block and everything after it
    (cache_refresh = n refills the cache every n steps; n = 1 is the exact sampler again)

`cached_hidden` runs the model's own modules (embeddings, each layer's projections, attention
and MLP, the final norm), with the cache between a layer's projection and its attention. A
refresh writes the cache, so it runs eagerly even under torch.compile. Keys/values outside the
window are the last refresh's: approximate (docs/sampler.md, "Key/value caches").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minidiff.model import ModernBertMLM, additive, compute_dtype, rotary_table


@dataclass
class KVCache:
    """Every layer's keys and values (after rotary) at every canvas position [B, heads, T, d].

    Filled by `cached_hidden(model, canvas, mask, KVCache())`; read by `cached_hidden(model, ids [B, Q],
    mask, cache.at(positions [B, Q]))`, the ids sitting at these canvas positions (>= T: an unused
    slot). A read's fresh keys/values stand in for the stale cached ones and are not written back:
    the cache changes only at a fill. Memory per canvas token: 2 x layers x hidden x bytes.
    """

    keys: list = field(default_factory=list)  # per layer [B, heads, T, d]
    values: list = field(default_factory=list)  # per layer [B, heads, T, d]
    positions: torch.Tensor | None = None  # [B, Q] canvas positions of the inputs; None = fill

    def at(self, positions: torch.Tensor) -> "KVCache":
        """The same cache, read by inputs at canvas positions [B, Q]."""
        return KVCache(self.keys, self.values, positions)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """What layer `layer`'s queries attend to. Fill: keep the fresh k, v [B, heads, T, d] (layer 0
        starts the fill over) and return them; read: [cached canvas | fresh inputs], [B, heads, T + Q, d]."""
        if self.positions is None:
            # v is a view into the layer's whole qkv projection: keep a copy of its own, so the
            # cache holds 2 x hidden values per token, not the 3 x hidden buffer behind the view
            self.keys[layer:], self.values[layer:] = [k], [v.clone(memory_format=torch.contiguous_format)]
            return k, v
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)

    @property
    def canvas_length(self) -> int:
        return self.keys[0].shape[2]


def cached_attention_masks(positions, attention_mask, canvas_length: int, local_attention: int):
    """Boolean SDPA masks [B, 1, Q, T + Q] (global, local) for inputs at canvas positions [B, Q]
    over the keys [cached canvas (T) | fresh inputs (Q)]. A cached key is hidden where an input
    recomputes that position; positions >= T are unused slots (hidden as keys); every input sees
    its own fresh key, so no row is empty. Local layers: |i - j| <= local_attention // 2."""
    B, Q = positions.shape
    T, device = canvas_length, positions.device
    valid = positions < T  # [B, Q]
    slot = positions.clamp(max=T - 1)
    canvas = torch.arange(T, device=device)
    recomputed = ((positions[:, :, None] == canvas) & valid[:, :, None]).any(1)  # [B, T]
    cached_ok, fresh_ok = ~recomputed, valid
    if attention_mask is not None:
        canvas_ok = attention_mask.bool()
        cached_ok = cached_ok & canvas_ok
        fresh_ok = fresh_ok & canvas_ok.gather(1, slot)
    key_ok = torch.cat([cached_ok, fresh_ok], 1)[:, None, :]  # [B, 1, T + Q]
    key_position = torch.cat([canvas.expand(B, T), slot], 1)  # [B, T + Q]
    itself = torch.cat([torch.zeros(Q, T, dtype=torch.bool, device=device),
                        torch.eye(Q, dtype=torch.bool, device=device)], 1)  # [Q, T + Q]
    band = (slot[:, :, None] - key_position[:, None, :]).abs() <= local_attention // 2
    global_mask = key_ok | itself  # [B, Q, T + Q]
    local_mask = (key_ok & band) | itself
    return global_mask[:, None], local_mask[:, None]


def read_rotary_and_masks(encoder, x, attention_mask, cache: KVCache):
    """Encoder.rotary_and_masks for inputs x [B, Q, H] at the canvas positions cache.positions:
    each input's angles at its own position [B, 1, Q, d], the masks of cached_attention_masks."""
    T, c, dtype = cache.canvas_length, encoder.config, compute_dtype(x)
    masks = cached_attention_masks(cache.positions, attention_mask, T, c.local_attention)
    slot = cache.positions.clamp(max=T - 1)  # [B, Q]
    out = {}
    for is_global, theta, mask in ((True, c.global_rope_theta, masks[0]), (False, c.local_rope_theta, masks[1])):
        rope = [t[slot][:, None] for t in rotary_table(theta, c.head_dim, T, x.device, dtype)]  # [B, 1, Q, d]
        out[is_global] = (rope, additive(mask, dtype))
    return out


def cached_hidden(model: ModernBertMLM, input_ids, attention_mask, cache: KVCache):
    """model.hidden with a key/value cache (see KVCache): fill, or read at cache.positions."""
    encoder = model.model
    x = encoder.embeddings(input_ids)  # [B, Q, H]
    if cache.positions is None:
        per_kind = encoder.rotary_and_masks(x, attention_mask)
    else:
        per_kind = read_rotary_and_masks(encoder, x, attention_mask, cache)
    for layer in encoder.layers:  # EncoderLayer.forward, the cache between projection and attention
        (cos, sin), mask = per_kind[layer.is_global]
        q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)  # each [B, heads, Q, d]
        k, v = cache.keys_values(layer.index, k, v)  # [B, heads, Q or T + Q, d]
        x = x + layer.attn.attend(q, k, v, mask)
        x = x + layer.mlp(layer.mlp_norm(x))
    return encoder.final_norm(x)  # [B, Q, H]


class CachedLogits:
    """A logits source served from a KVCache, filling it (`fill`) or reading it. `block` [B, K]: the
    block's canvas positions (consecutive per row); `window`: prefix mode's recomputed positions."""

    def __init__(self, model, cache: KVCache, mode: str, fill: bool, window: int, block: torch.Tensor):
        self.model, self.cache, self.mode, self.fill, self.window, self.block = model, cache, mode, fill, window, block

    def __call__(self, ids, attention_mask, positions):
        if self.fill:
            h, start = cached_hidden(self.model, ids, attention_mask, self.cache), 0  # [B, T, H]
        else:
            block = self.block.repeat(positions.shape[0] // self.block.shape[0], 1)  # cfg: [2B, K]
            start = block[:, :1]  # [B, 1]
            if self.mode == "dual":
                recomputed = block  # [B, K]
            else:  # the block's first position onwards; past the canvas end = unused slots
                recomputed = start + torch.arange(self.window, device=start.device)[None, :]  # [B, W]
            inputs = ids.gather(1, recomputed.clamp(max=ids.shape[1] - 1))  # [B, Q]
            h = cached_hidden(self.model, inputs, attention_mask, self.cache.at(recomputed))  # [B, Q, H]
        h = h.gather(1, (positions - start)[..., None].expand(-1, -1, h.shape[-1]))  # [B, N, H]
        return self.model.decoder(self.model.head(h))  # [B, N, V]


class BlockLogits:
    """The logits source of every step of one block [B, K], and which steps refresh the cache."""

    def __init__(self, model, options, block: torch.Tensor, canvas_length: int):
        self.model, self.mode, self.refresh_every = model, options.cache, options.cache_refresh
        if self.mode == "none":
            return
        if not isinstance(model, ModernBertMLM):
            raise TypeError("cached sampling needs a minidiff ModernBertMLM (its encoder's modules)")
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
