"""The sampler's fixed-shape step: approximate key/value caching and torch.compile.

References: Fast-dLLM (arXiv 2505.22618; NVlabs/Fast-dLLM, ported as dllm's `fastdllm`
pipeline): prefix and dual key/value caches refreshed at every block start, whose full forward
also serves as the block's first step; LLaDA (arXiv 2502.09992) for the step itself.

Per block of K positions (canvas T, per-row block positions [B, K]):

    step 0 (refresh):  the full canvas forward fills a KVCache; its logits at the block are used
    step i (cached):   "dual":   the encoder runs on the block's K positions only; their queries
                                 attend to cached keys/values outside the block, fresh ones inside
                       "prefix": the encoder runs on the block and everything after it
                                 (width W = T - earliest block start); only what precedes the
                                 block comes from the cache
    (cache_refresh = n refills the cache every n steps; n = 1 is the exact sampler again)

Compiled, every step has the same shapes: logits over the whole block (committed positions
simply cannot be chosen: their confidence is -inf), the transfer counts come from the schedule
tensor on the device, and the step returns new tensors instead of writing into reused ones, so
`torch.compile(fullgraph=True)` (mode "reduce-overhead" on CUDA: CUDA graphs) traces it once per
block shape. Eager, the same step takes logits only at as many still-masked positions as the
host knows may remain (from the schedule, or the late count), since with a 256k vocabulary the
logits of one position cost more than all encoder layers for one token. The step reads nothing on the host. Threshold decoding needs one host number per
step (masks left); it is copied without blocking and read one step late, so a block that is
already finished may get one extra step, which commits nothing (every confidence is -inf).

Cost of the approximation: cached keys/values of positions outside the recomputed window are
those of the canvas at the last refresh, while tokens committed since then have changed them;
see docs for measured agreement with the exact sampler.
"""
from __future__ import annotations

import torch

from .device import model_device
from .model import KVCache
from .sampler import _masked_first, denoise_step, record_step


class CachedLogits:
    """The model as `denoise_step` calls it, `(ids [B, T], mask, logits_at [B, K]) -> [B, K, V]`,
    served from a KVCache: `fill=True` runs the full canvas and fills the cache; otherwise only
    the block ("dual") or the block and what follows it ("prefix", `width` positions) run."""

    def __init__(self, model, cache: KVCache, mode: str, fill: bool, width: int, block):
        self.model, self.cache, self.mode, self.fill, self.width = model, cache, mode, fill, width
        self.block = block  # [B, K] the block's canvas positions (consecutive per row)

    def __call__(self, canvas, attention_mask, logits_at):
        if self.fill:
            h = self.model.hidden(canvas, attention_mask, cache=self.cache)  # [B, T, H]
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))  # [B, K, H]
            return self.model.logits_from_hidden(h)
        block = self.block.repeat(logits_at.shape[0] // self.block.shape[0], 1)  # cfg: [2B, K]
        start = block[:, :1]  # [B, 1]
        if self.mode == "dual":
            positions = block  # [B, K]
        else:  # the block's first position onwards; past the canvas end = unused slots
            positions = start + torch.arange(self.width, device=start.device)[None, :]  # [B, W]
        ids = canvas.gather(1, positions.clamp(max=canvas.shape[1] - 1))  # [B, Q]
        h = self.model.hidden(ids, attention_mask, cache=self.cache.at(positions))  # [B, Q, H]
        h = h.gather(1, (logits_at - start)[..., None].expand(-1, -1, h.shape[-1]))  # [B, N, H]
        return self.model.logits_from_hidden(h)  # [B, N, V]


def static_step(model, cache: KVCache | None, fill: bool, width: int, canvas, attention_mask,
                positions, counts, given, config, mask_id: int, eos_id: int, generator=None,
                logit_width: int | None = None):
    """One denoising step at fixed shapes on the block positions [B, K].

    Logits over the whole block (logit_width None), or over each row's first `logit_width`
    still-masked block positions (padded with committed ones). cache None: the full-canvas
    model; else CachedLogits(fill, width). Returns new tensors (canvas [B, T], the positions
    with logits [B, N], committed [B, N], masks left in the fullest row's block (0-d)); no host
    read, no write into an input."""
    where = positions if logit_width is None else _masked_first(canvas, positions, logit_width, mask_id)
    logits_fn = model if cache is None else CachedLogits(model, cache, config.cache, fill, width, positions)
    canvas = canvas.clone()
    committed = denoise_step(logits_fn, canvas, attention_mask, where, counts, given, config,
                             mask_id, eos_id, generator)
    left = (canvas.gather(1, positions) == mask_id).sum(1).amax()
    return canvas, where, committed, left


class LateCount:
    """A 0-d device count read on the host one step late: `push` starts a non-blocking copy,
    `read` (after the next step is queued) waits for that copy only."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def push(self, count: torch.Tensor) -> None:
        self.host.copy_(count, non_blocking=True)
        if self.cuda:
            self.event.record()
        self.pending = True

    def read(self) -> int | None:
        if not self.pending:
            return None
        if self.cuda:
            self.event.synchronize()
        self.pending = False
        return int(self.host)


_COMPILED = {}


def compiled_static_step(device: torch.device):
    """static_step under torch.compile(fullgraph=True); CUDA graphs on CUDA ("reduce-overhead")."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(static_step, fullgraph=True, mode=mode)
    return _COMPILED[mode]


class StaticSteps:
    """Runs the step loop of `sampler._denoise`'s blocks with static_step (cached and/or compiled)."""

    def __init__(self, model, config, mask_id: int, eos_id: int):
        if config.cache != "none" and not hasattr(model, "logits_from_hidden"):
            raise TypeError("cached sampling needs a minidiff ModernBertMLM (hidden + logits_from_hidden)")
        self.model, self.config, self.mask_id, self.eos_id = model, config, mask_id, eos_id
        self.cache = KVCache() if config.cache != "none" else None
        device = model_device(model)
        self.step = compiled_static_step(device) if config.compile else static_step
        self.device = device

    def run_block(self, out, b, ids, canvas, positions, plan, generator, callback):
        """Block b's steps (canvas: sampler.Canvas, plan: sampler.BlockPlan); returns the new ids.
        One host read per block (the prefix width).

        Compiled: logits over the whole block (one shape per block). Eager: over as many
        positions as the host knows may still be masked (from the plan, or the late count)."""
        config, cache = self.config, self.cache
        width = 0
        if config.cache == "prefix":  # the block and what follows, for the row that starts first
            width = ids.shape[1] - int(positions[:, 0].min())
        masks_left = LateCount(self.device) if plan.counts is None else None
        bound = plan.most_left(0)  # masks left in the fullest row, or an upper bound of it
        for i in range(plan.num_steps):
            refresh = cache is not None and (i == 0 or (config.cache_refresh is not None
                                                         and i % config.cache_refresh == 0))
            counts = None if plan.counts_on_device is None else plan.counts_on_device[:, i]  # [B]
            if plan.counts is not None:
                bound = plan.most_left(i)
            if bound == 0:
                break
            logit_width = None if config.compile else bound
            # the fill writes the cache (a side effect), so it always runs eagerly
            step = static_step if refresh else self.step
            ids, where, committed, left = step(self.model, cache, refresh, width, ids,
                                               canvas.attention_mask, positions, counts, canvas.given,
                                               config, self.mask_id, self.eos_id, generator, logit_width)
            # copies: a CUDA graph reuses its output buffers at the next replay
            ids, where, committed, left = ids.clone(), where.clone(), committed.clone(), left.clone()
            record_step(out, b, ids, where, committed, callback)
            if masks_left is not None:  # threshold: the count after step i - 1, read now
                bound = masks_left.read()  # None before the first push
                if bound == 0:
                    break  # step i found a finished block and committed nothing
                bound = max(plan.masked) if bound is None else bound
                masks_left.push(left)
        return ids
