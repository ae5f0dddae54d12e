"""The block sampler: fill a canvas of masks block by block, the most confident tokens first.

References: LLaDA (arXiv 2502.09992: blocks, low-confidence remasking; its `generate.py`),
Fast-dLLM (2505.22618: threshold decoding), Diffutron (2603.20466: settings, repetition penalty).

The canvas is [prompt | max_new_tokens x <mask>]; the answer is cut into blocks of `block_length`,
denoised left to right in ceil(steps / blocks) steps each. One step (`denoise_step`):
    1. logits at the block     cfg > 0: un + (cfg + 1)(cond - un), `un` with the prompt masked
    2. repetition penalty      l / p if l > 0 else l * p, for every id on the row's canvas
    3. candidate               argmax l (T = 0), or argmax exp(l) / (-log u)^T (Gumbel-max)
    4. confidence              softmax(l)[candidate], or U(0, 1) ("random" remasking)
    5. commit                  the k most confident masked positions (k: the unmasking schedule),
                               or all with confidence >= threshold (at least one); never re-masked
This is the plain loop: the model on the whole canvas every step. The fast loop the scripts use
(logits at masked positions only, key/value caches, compiled step, stop strings) is
minidiff/speed/sampling.py. Reader's page: docs/sampler.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from minidiff.errors import UserError

REMASKING = ("low_confidence", "random")
UNMASKING = ("dllm", "llada")  # unmasking schedules: how many tokens each step commits
CACHES = ("none", "prefix", "dual")
FORK_STOP_STRINGS = ("<s>", "</s>", "<|USER|>", "|USER|>")  # the Diffutron fork's stop strings


# ----------------------------------------------------------------------------- the settings
@dataclass
class SamplerConfig:
    """Every knob of the sampler. Defaults are plain LLaDA decoding; see `preset` for Diffutron's."""

    max_new_tokens: int = 128
    steps: int = 128
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"  # "low_confidence" | "random"
    stochastic: bool = False  # Binomial draw of the per-step count instead of rounding (dllm)
    cfg_scale: float = 0.0
    repetition_penalty: float = 1.0
    # the unmasking schedule: "dllm": round(m_left / (N - j)) | "llada": m // N, first m % N get +1
    unmasking: str = "dllm"
    threshold: float | None = None  # parallel decoding: commit all candidates with conf >= threshold
    stop_strings: tuple[str, ...] = ()  # the fork's stop rule (data/chat.py StopRules; needs a tokenizer)
    stop_at_eos: bool = True  # StopRules: stop once every row has eos / [/Answer] in a finished block
    seed: int | None = None  # for temperature > 0, random remasking and stochastic unmasking
    cache: str = "none"  # the fast loop's (speed/sampling.py) key/value caches: "prefix" | "dual"
    cache_refresh: int | None = None  # refill them every n steps of a block (None: at its start only)
    compile: bool = False  # the fast loop's compiled step

    PRESETS = {  # Diffutron's model-card settings (2603.20466), 128 or 64 new tokens, the fork's penalty and stops
        name: dict(max_new_tokens=n, steps=n, block_length=32, temperature=0.1, repetition_penalty=1.2,
                   stop_strings=FORK_STOP_STRINGS) for name, n in (("diffutron-long", 128), ("diffutron-short", 64))}

    def __post_init__(self) -> None:
        self.stop_strings = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        count = lambda v, low: isinstance(v, int) and v >= low  # noqa: E731
        number = lambda v, low: v >= low and math.isfinite(v)  # noqa: E731
        for name, ok, expected in [
            ("max_new_tokens", count(self.max_new_tokens, 1), "an integer >= 1"),
            ("steps", count(self.steps, 1), "an integer >= 1"),
            ("block_length", count(self.block_length, 1), "an integer >= 1"),
            ("temperature", number(self.temperature, 0), "a finite number >= 0"),
            ("remasking", self.remasking in REMASKING, f"one of {', '.join(REMASKING)}"),
            ("unmasking", self.unmasking in UNMASKING, f"an unmasking schedule, one of {', '.join(UNMASKING)}"),
            ("cfg_scale", number(self.cfg_scale, 0), "a finite number >= 0"),
            ("repetition_penalty", number(self.repetition_penalty, 0) and self.repetition_penalty > 0,
             "a finite number > 0"),
            ("threshold", self.threshold is None or 0 < self.threshold <= 1, "None or a confidence in (0, 1]"),
            ("stop_strings", all(isinstance(s, str) and s for s in self.stop_strings), "non-empty strings"),
            ("seed", self.seed is None or (count(self.seed, 0) and self.seed < 2**63), "None or an integer < 2^63"),
            ("cache", self.cache in CACHES, f"one of {', '.join(CACHES)}"),
            ("cache_refresh", self.cache_refresh is None or count(self.cache_refresh, 1), "None or an integer >= 1"),
            ("stochastic", not (self.stochastic and self.unmasking == "llada"),
             "False with unmasking 'llada' (Binomial counts exist for the schedule 'dllm' only)"),
            ("compile", not (self.compile and self.seed is not None
                             and (self.temperature > 0 or self.remasking == "random")),
             "False with a seed and random draws (the compiled step's draws cannot follow a seed)"),
        ]:
            if not ok:
                raise UserError(f"sampler config: {name} must be {expected}, got {getattr(self, name)!r}.")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SamplerConfig":
        if name not in cls.PRESETS:
            raise UserError(f"unknown sampler preset {name!r}; expected one of {', '.join(cls.PRESETS)}.")
        return cls(**{**cls.PRESETS[name], **overrides})

    def replace(self, **changes) -> "SamplerConfig":
        return replace(self, **changes)


@dataclass
class Canvas:
    """What the block loop denoises, built once by `build_canvas` for generate and infill."""

    ids: torch.Tensor  # [B, T] long, before the first step: each row's tokens (<mask> to fill), eos-padded
    attention_mask: torch.Tensor | None  # [B, T] each row's own positions; None: every row fills T
    given: torch.Tensor  # [B, T] bool: the given tokens, which cfg's unconditional pass masks
    blocks: list[torch.Tensor]  # one [B, K] tensor of canvas positions per block, left to right
    steps_per_block: int  # ceil(steps / number of blocks), at most the widest block (steps_per_block)
    answer_start: list[int]  # per row: where its answer (what the sampler fills) begins
    answer_end: list[int]  # per row: the end of the canvas it owns
    mask_id: int  # the token the sampler fills
    eos_id: int  # the padding of shorter rows


# ----------------------------------------------------------------------------- the unmasking schedule
def transfer_counts(masked: int, steps: int, unmasking: str = "dllm", *, stochastic: bool = False,
                    generator: torch.Generator | None = None) -> list[int]:
    """How many of `masked` tokens each step reveals (0s dropped). dllm: round(m_left (1 - s/t)), s = (N-j-1)/N,
    t = (N-j)/N, in its float32 (`stochastic`: a Binomial draw); llada: m // N each, the first m % N one more."""
    if unmasking == "llada":
        base, extra = divmod(masked, steps)
        return [c for c in (base + (j < extra) for j in range(steps)) if c > 0]
    counts, left = [], masked
    for j in range(steps):
        if left == 0:
            break
        # dllm's reverse_mask_prob s/t = (1 - alpha(s)) / (1 - alpha(t)), alpha(t) = 1 - t, in float32
        s, t = (torch.tensor(x / steps, dtype=torch.float32) for x in (steps - j - 1, steps - j))
        reveal = torch.tensor(1 - float((1 - (1 - s)) / (1 - (1 - t))), dtype=torch.float64)
        if stochastic:  # a draw of Binomial(m_left, 1 - s/t)
            count = int(torch.binomial(torch.tensor([left], dtype=torch.float64), reveal[None], generator=generator))
        else:
            count = int(torch.round(left * reveal))  # half to even
        counts.append(min(count, left))
        left -= counts[-1]
    return [c for c in counts if c > 0]


def steps_per_block(steps: int, span: int, block_length: int) -> tuple[int, int]:
    """(asked, used): ceil(steps / blocks) over `span`, and that capped at the widest block (docs/sampler.md)."""
    asked = math.ceil(steps / math.ceil(span / block_length))
    return asked, min(asked, block_length, span)


@dataclass
class BlockPlan:
    """One block's unmasking plan, made on the host once at the block's start."""

    masked: list[int]  # per row: masks in the block
    counts: list[list[int]] | None  # per row: tokens each step commits (None: threshold decoding)
    counts_on_device: torch.Tensor | None  # [B, num_steps] the same counts, on the canvas's device
    num_steps: int  # threshold decoding: the most it can take (at least one commit per step)


def plan_block(ids: torch.Tensor, block: torch.Tensor, steps: int, config: SamplerConfig,
               mask_id: int, host_generator=None) -> BlockPlan:
    """Masks in the block [B, K] per row -> how many each step commits (rows right-padded with 0)."""
    masked = (ids.gather(1, block) == mask_id).sum(1).tolist()
    if config.threshold is not None:
        return BlockPlan(masked, None, None, max(masked))
    rows = [transfer_counts(m, steps, config.unmasking, stochastic=config.stochastic,
                            generator=host_generator) for m in masked]
    width = max(len(r) for r in rows)
    counts = [r + [0] * (width - len(r)) for r in rows]
    on_device = torch.tensor(counts, dtype=torch.long, device=ids.device).reshape(len(counts), width)
    return BlockPlan(masked, counts, on_device, width)


# ----------------------------------------------------------------------------- one step
def denoise_step(logits_fn, ids: torch.Tensor, canvas: Canvas, positions: torch.Tensor,
                 counts: torch.Tensor | None, config: SamplerConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One step at the block positions [B, K], in place on ids [B, T]; returns what it committed [B, K].
    logits_fn(ids, attention_mask, positions) -> [B, K, V]; counts [B]: each row's k (unused with a
    threshold). No host read: no .item(), .tolist() or `if` on a tensor."""
    B, K = positions.shape  # 1. logits at the block positions
    if config.cfg_scale > 0:
        unconditional = ids.masked_fill(canvas.given, canvas.mask_id)
        both_mask = None if canvas.attention_mask is None else canvas.attention_mask.repeat(2, 1)
        both = torch.cat([ids, unconditional])  # [2B, T]
        cond, uncond = logits_fn(both, both_mask, positions.repeat(2, 1)).float().chunk(2)  # [B, K, V] each
        # l = un + (cfg + 1) (cond - un)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)  # [B, K, V]
    else:
        logits = logits_fn(ids, canvas.attention_mask, positions).float()  # [B, K, V]
    if config.repetition_penalty != 1.0:
        # 2. every id on the row's canvas but mask and eos: l <- l / p if l > 0 else l * p. Only
        # those <= T ids change: gather them, penalise, scatter back (duplicates write the same value)
        present = ids[:, None, :].expand(B, K, ids.shape[1])  # [B, K, T]
        values, p = logits.gather(-1, present), config.repetition_penalty
        exempt = (present == canvas.mask_id) | (present == canvas.eos_id)
        penalised = torch.where(values > 0, values / p, values * p)
        logits = logits.scatter(-1, present, torch.where(exempt, values, penalised))  # [B, K, V]
    if config.temperature > 0:
        # 3. Gumbel-max in float64: argmax exp(l) / (-log u)^T  ==  a draw from softmax(l / T)
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        candidates = (logits.double().exp() / (-noise.log()) ** config.temperature).argmax(-1)  # [B, K]
    else:
        candidates = logits.argmax(-1)  # [B, K]
    if config.remasking == "low_confidence":
        # 4. confidence = softmax(l)[candidate], untempered
        confidence = logits.softmax(-1).gather(-1, candidates[..., None]).squeeze(-1)  # [B, K]
    else:
        confidence = torch.rand((B, K), device=logits.device, generator=generator)
    current = ids.gather(1, positions)  # [B, K]
    masked = current == canvas.mask_id
    confidence = confidence.masked_fill(~masked, -math.inf)
    # 5. rank of each position by confidence within its row (0 = most confident)
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=order.device).expand(B, K))
    if config.threshold is not None:
        # commit every candidate with confidence >= threshold, and at least the most confident
        commit = masked & ((confidence >= config.threshold) | (rank == 0))
    else:
        commit = masked & (rank < counts[:, None])  # the k most confident
    ids.scatter_(1, positions, torch.where(commit, candidates, current))
    return commit


# ----------------------------------------------------------------------------- the block loop
class Sampled(NamedTuple):
    sequences: torch.Tensor  # [B, T] long: the filled canvas, each row right-padded with eos
    num_forward: int  # model calls made (a cfg step's doubled batch is one call)


def random_generators(seed: int | None, device) -> tuple[torch.Generator | None, torch.Generator | None]:
    """(the step's draws, on the device; stochastic counts, on the host): None without a seed."""
    if seed is None:
        return None, None
    return torch.Generator(device=device).manual_seed(seed), torch.Generator().manual_seed(seed + 1)


@torch.no_grad()
def denoise(model, canvas: Canvas, config: SamplerConfig, end_of_block=None) -> Sampled:
    """The blocks left to right, every step the model on the whole canvas (LLaDA's generate.py).
    end_of_block(ids, canvas, block, last) -> bool after each block may write into ids [B, T]
    (stop rules: data/chat.py StopRules) and end the loop; None: every block is denoised."""
    if config.cache != "none" or config.compile:
        raise UserError(f"sampler config: cache={config.cache!r} and compile={config.compile} need the fast "
                        "loop: call minidiff.speed.sampling.generate or infill, not minidiff.sampler's.")
    generator, host_generator = random_generators(config.seed, canvas.ids.device)
    ids, calls = canvas.ids.clone(), 0  # ids [B, T], written in place
    for b, block in enumerate(canvas.blocks):
        plan = plan_block(ids, block, canvas.steps_per_block, config, canvas.mask_id, host_generator)
        for i in range(plan.num_steps):
            if plan.counts is None and not (ids.gather(1, block) == canvas.mask_id).any():
                break  # threshold decoding: the block is filled (a host read per step)
            counts = None if plan.counts is None else plan.counts_on_device[:, i]  # [B]
            denoise_step(model.logits_at_positions, ids, canvas, block, counts, config, generator)
            calls += 1
        if end_of_block is not None and end_of_block(ids, canvas, block, b + 1 == len(canvas.blocks)):
            break
    return Sampled(ids, calls)


# ----------------------------------------------------------------------------- generate and infill
def build_canvas(rows: list[list[int]], block_starts: list[int], span: int, answer_start: list[int],
                 config: SamplerConfig, *, mask_id: int, eos_id: int, device) -> Canvas:
    """The canvas of `rows` (token ids, <mask> where the sampler fills), right-padded with eos, and
    its blocks: block b covers block_starts[r] + [b L, min((b + 1) L, span)) in row r."""
    lengths = [len(r) for r in rows]
    T, L = max(lengths), config.block_length
    ids = torch.tensor([row + [eos_id] * (T - len(row)) for row in rows], dtype=torch.long, device=device)  # [B, T]
    own = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long().to(device)  # [B, T] never the padding
    attention_mask = own if len(set(lengths)) > 1 else None  # None: every row fills T
    given = (ids != mask_id) & (ids != eos_id)  # [B, T] what cfg's unconditional pass masks (as the fork)
    starts = torch.tensor(block_starts, dtype=torch.long, device=device)[:, None]  # [B, 1]
    blocks = [starts + torch.arange(b * L, min((b + 1) * L, span), device=device)[None, :]
              for b in range(math.ceil(span / L))]  # each [B, K]
    _, steps = steps_per_block(config.steps, span, L)
    return Canvas(ids, attention_mask, given, blocks, steps, list(answer_start), lengths, mask_id, eos_id)


def model_canvas(model, rows, config: SamplerConfig, *, mask_id: int, eos_id: int, infill: bool) -> Canvas:
    """The canvas of generate (rows: prompts, each then max_new_tokens <mask>, blocks from its end) or of
    infill (rows: lists of ids with <mask> anywhere, blocks tiling each from 0, the answer from its first mask)."""
    lengths, device = [len(r) for r in rows], next(iter(model.parameters()), torch.empty(0)).device
    if infill:
        first_mask = [row.index(mask_id) if mask_id in row else n for row, n in zip(rows, lengths)]
        return build_canvas(rows, [0] * len(rows), max(lengths), first_mask, config,
                            mask_id=mask_id, eos_id=eos_id, device=device)
    n = config.max_new_tokens
    return build_canvas([row + [mask_id] * n for row in rows], lengths, n, lengths, config,
                        mask_id=mask_id, eos_id=eos_id, device=device)


def generate(model, prompts, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int,
             end_of_block=None) -> Sampled:
    """`max_new_tokens` after each prompt (token-id lists, lengths may differ): sequences [B, longest
    prompt + max_new_tokens], right-padded with eos. Stop rules only as `end_of_block` (`denoise`)."""
    config = config or SamplerConfig()
    canvas = model_canvas(model, prompts, config, mask_id=mask_id, eos_id=eos_id, infill=False)
    return denoise(model, canvas, config, end_of_block)


def infill(model, ids_with_masks, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int) -> Sampled:
    """Fill every mask of the given sequences (masks anywhere), in blocks tiling each from position
    0; `max_new_tokens` and the stop rules are not used."""
    config = config or SamplerConfig()
    canvas = model_canvas(model, ids_with_masks, config, mask_id=mask_id, eos_id=eos_id, infill=True)
    return denoise(model, canvas, config)
