"""The block sampler: fill a canvas of masks block by block, the most confident tokens first.
References: LLaDA (arXiv 2502.09992, its `generate.py`), Fast-dLLM (2505.22618: threshold decoding),
Diffutron (2603.20466: settings, repetition penalty). The plain loop (the model on the whole canvas
every step), one step numbered as in docs/sampler.md; the scripts' fast loop: minidiff/speed/sampling.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from minidiff.errors import UserError
from minidiff.model import model_device

REMASKING = ("low_confidence", "random")
UNMASKING = ("dllm", "llada")  # unmasking schedules
FORK_STOP_STRINGS = ("<s>", "</s>", "<|USER|>", "|USER|>")  # the Diffutron fork's (the fast loop's presets)


@dataclass
class SamplerConfig:
    """Every setting of the algorithm. Defaults are plain LLaDA decoding; see `preset` for Diffutron's."""
    max_new_tokens: int = 128
    steps: int = 128
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"  # "low_confidence" | "random"
    stochastic: bool = False  # Binomial draw of the per-step count instead of rounding (dllm)
    cfg_scale: float = 0.0
    repetition_penalty: float = 1.0
    unmasking: str = "dllm"  # the unmasking schedule: "dllm" | "llada" (`transfer_counts`)
    threshold: float | None = None  # parallel decoding: commit all candidates with conf >= threshold
    top_k: int | None = None  # the draw only from the k most likely tokens (None or 0: all)
    top_p: float = 1.0  # the draw only from the most likely tokens holding this mass (1: all)
    seed: int | None = None  # for temperature > 0, random remasking and stochastic unmasking

    PRESETS = {  # Diffutron's model-card settings (2603.20466): 128 or 64 new tokens, the fork's penalty
        name: dict(max_new_tokens=n, steps=n, block_length=32, temperature=0.1, repetition_penalty=1.2)
        for name, n in (("diffutron-long", 128), ("diffutron-short", 64))}

    def __post_init__(self) -> None:
        count = lambda v, low: isinstance(v, int) and v >= low  # noqa: E731
        number = lambda v, low: v >= low and math.isfinite(v)  # noqa: E731
        checks = [(name, count(getattr(self, name), 1), "an integer >= 1") for name in ("max_new_tokens", "steps")]
        for name, ok, expected in checks + [
            ("block_length", count(self.block_length, 1), "an integer >= 1"),
            ("temperature", number(self.temperature, 0), "a finite number >= 0"),
            ("cfg_scale", number(self.cfg_scale, 0), "a finite number >= 0"),
            ("remasking", self.remasking in REMASKING, f"one of {', '.join(REMASKING)}"),
            ("unmasking", self.unmasking in UNMASKING, f"an unmasking schedule, one of {', '.join(UNMASKING)}"),
            ("repetition_penalty", number(self.repetition_penalty, 0) and self.repetition_penalty > 0,
             "a finite number > 0"),
            ("threshold", self.threshold is None or 0 < self.threshold <= 1, "None or a confidence in (0, 1]"),
            ("top_k", self.top_k is None or count(self.top_k, 0), "None or an integer >= 0 (0: off)"),
            ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "a number in (0, 1] (1: off)"),
            ("seed", self.seed is None or (count(self.seed, 0) and self.seed < 2**63), "None or an integer < 2^63"),
            ("stochastic", not (self.stochastic and self.unmasking == "llada"),
             "False with unmasking 'llada' (Binomial counts exist for the schedule 'dllm' only)"),
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
    """What the block loop denoises, built by `build_canvas` for generate and infill."""
    ids: torch.Tensor  # [B, T] long, before the first step: each row's tokens (<mask> to fill), eos-padded
    attention_mask: torch.Tensor | None  # [B, T] each row's own positions; None: every row fills T
    given: torch.Tensor  # [B, T] bool: the given tokens, which cfg's unconditional pass masks
    blocks: list[torch.Tensor]  # one [B, K] tensor of canvas positions per block, left to right
    steps_per_block: int  # ceil(steps / number of blocks), at most the widest block (steps_per_block)
    answer_start: list[int]  # per row: where its answer (what the sampler fills) begins
    answer_end: list[int]  # per row: the end of the canvas it owns
    mask_id: int  # the token the sampler fills
    eos_id: int  # the padding of shorter rows


def build_canvas(rows: list[list[int]], block_starts: list[int], span: int, answer_start: list[int],
                 config: SamplerConfig, *, mask_id: int, eos_id: int, device) -> Canvas:
    """`rows` (<mask> to fill) eos-padded; block b: block_starts[r] + [b L, min((b + 1) L, span)) in row r."""
    lengths, L = [len(r) for r in rows], config.block_length
    T = max(lengths)
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
    """generate's canvas (each prompt then max_new_tokens <mask>) or infill's (<mask> anywhere, blocks from 0)."""
    lengths, device = [len(r) for r in rows], model_device(model)
    if infill:
        first_mask = [row.index(mask_id) if mask_id in row else n for row, n in zip(rows, lengths)]
        return build_canvas(rows, [0] * len(rows), max(lengths), first_mask, config,
                            mask_id=mask_id, eos_id=eos_id, device=device)
    n = config.max_new_tokens
    return build_canvas([row + [mask_id] * n for row in rows], lengths, n, lengths, config,
                        mask_id=mask_id, eos_id=eos_id, device=device)


def transfer_counts(masked: int, steps: int, unmasking: str = "dllm", *, stochastic: bool = False,
                    generator: torch.Generator | None = None) -> list[int]:
    """How many of `masked` tokens each step reveals, 0s dropped (docs/sampler.md, "How many per step")."""
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
        # a draw of Binomial(m_left, 1 - s/t), or m_left (1 - s/t) rounded half to even
        count = (torch.binomial(torch.tensor([left], dtype=torch.float64), reveal[None], generator=generator)
                 if stochastic else torch.round(left * reveal))
        counts.append(min(int(count), left))
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


def keep_top(logits, top_k, top_p, temperature) -> torch.Tensor:
    """-inf but for the top_k largest logits (0, None: all), then the fewest likeliest holding top_p of
    softmax(l/T); tied logits rank by token id, as argmax breaks ties (top_k 1 keeps argmax's token)."""
    top_k, top_p, T = (torch.as_tensor(0 if x is None else x, device=logits.device)
                       for x in (top_k, top_p, temperature))
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, K, V]
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, V).long()
    ordered = ordered.masked_fill(torch.arange(V, device=logits.device) >= k, -math.inf)  # the k first
    p = (ordered / torch.where(T > 0, T, 1.0)).softmax(-1)
    ordered = ordered.masked_fill(p.cumsum(-1) - p >= top_p, -math.inf)  # the mass before it >= top_p
    return torch.empty_like(logits).scatter(-1, order, ordered)


def gumbel_max(logits, temperature, generator) -> torch.Tensor:
    """A draw from softmax(l / T) [B, K], in place in one float64 [B, K, V] tensor (docs/sampler.md)."""
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    # argmax l + T g, g = -log(-log u) a Gumbel draw  ==  argmax exp(l) / (-log u)^T
    return u.log_().neg_().log_().neg_().mul_(temperature).add_(logits).argmax(-1)


def denoise_step(logits_fn, ids: torch.Tensor, canvas: Canvas, positions: torch.Tensor,
                 counts: torch.Tensor | None, config: SamplerConfig, generator=None, numbers=None) -> torch.Tensor:
    """One step at positions [B, K], in place on ids [B, T]: what it committed [B, K]; no host read. counts [B]:
    each row's k (None: threshold). config picks the stages, `numbers` (speed.sampling.StepNumbers) if given
    holds their numbers as the compiled step's per-row tensors (one graph serves every request)."""
    n = config if numbers is None else numbers
    B, K = positions.shape
    if config.cfg_scale > 0:  # 1. the logits at the block; cfg: `un` has the prompt masked
        both_mask = None if canvas.attention_mask is None else canvas.attention_mask.repeat(2, 1)
        both = torch.cat([ids, ids.masked_fill(canvas.given, canvas.mask_id)])  # [2B, T]
        cond, uncond = logits_fn(both, both_mask, positions.repeat(2, 1)).float().chunk(2)  # [B, K, V] each
        # l = un + (cfg + 1) (cond - un)
        logits = uncond + (n.cfg_scale + 1) * (cond - uncond)  # [B, K, V]
    else:
        logits = logits_fn(ids, canvas.attention_mask, positions).float()  # [B, K, V]
    if config.repetition_penalty != 1.0:
        # 2. the row's canvas ids but mask and eos: l <- l / p if l > 0 else l * p (gather, penalise, scatter)
        present, p = ids[:, None, :].expand(B, K, ids.shape[1]), n.repetition_penalty  # [B, K, T]
        values = logits.gather(-1, present)
        exempt = (present == canvas.mask_id) | (present == canvas.eos_id)
        penalised = torch.where(values > 0, values / p, values * p)
        logits = logits.scatter(-1, present, torch.where(exempt, values, penalised))  # [B, K, V]
    # <mask> is never an answer: no training loss scores it as an output (MDLM's rule)
    logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == canvas.mask_id, -math.inf)
    candidates = logits.argmax(-1)  # 3. [B, K]
    if config.temperature > 0:  # a draw from softmax(l / T), among the top_k / top_p if set
        kept = keep_top(logits, n.top_k, n.top_p, n.temperature) if config.top_k or config.top_p < 1 else logits
        drawn = gumbel_max(kept, n.temperature, generator)
        # the compiled step draws for every row and keeps the argmax where T = 0
        candidates = drawn if numbers is None else torch.where(numbers.temperature[..., 0] > 0, drawn, candidates)
    if config.remasking == "low_confidence":
        # 4. confidence = softmax(l)[candidate], untempered, unfiltered
        confidence = logits.softmax(-1).gather(-1, candidates[..., None]).squeeze(-1)  # [B, K]
    else:
        confidence = torch.rand((B, K), device=logits.device, generator=generator)
    current = ids.gather(1, positions)  # [B, K]
    masked = current == canvas.mask_id
    confidence = confidence.masked_fill(~masked, -math.inf)
    # rank of each position by confidence within its row (0 = most confident)
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=order.device).expand(B, K))
    counts = torch.ones(B, dtype=torch.long, device=ids.device) if counts is None else counts
    threshold = math.inf if config.threshold is None else n.threshold  # a float or [B, 1]
    # 5. the k most confident (threshold: at least the most confident), and all >= threshold
    commit = masked & ((rank < counts[:, None]) | (confidence >= threshold))
    ids.scatter_(1, positions, torch.where(commit, candidates, current))
    return commit


class Sampled(NamedTuple):
    sequences: torch.Tensor  # [B, T] long: the filled canvas, each row right-padded with eos
    num_forward: int  # model calls made (a cfg step's doubled batch is one call)


def random_generators(seed: int | None, device) -> tuple[torch.Generator | None, torch.Generator | None]:
    """(the step's draws, on the device; stochastic counts, on the host): None without a seed."""
    return (None, None) if seed is None else (torch.Generator(device=device).manual_seed(seed),
                                              torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def denoise(model, canvas: Canvas, config: SamplerConfig, end_of_block=None) -> Sampled:
    """The blocks left to right, the model on the whole canvas every step. end_of_block(ids, canvas,
    block, last) -> bool after each block may write into ids [B, T] (data/chat.py StopRules) and stop."""
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


def generate(model, prompts, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int,
             end_of_block=None) -> Sampled:
    """`max_new_tokens` after each prompt (id lists): [B, longest prompt + max_new_tokens], eos-padded."""
    config = config or SamplerConfig()
    canvas = model_canvas(model, prompts, config, mask_id=mask_id, eos_id=eos_id, infill=False)
    return denoise(model, canvas, config, end_of_block)


def infill(model, ids_with_masks, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int) -> Sampled:
    """Fill every mask of the given sequences, in blocks tiling each from position 0."""
    config = config or SamplerConfig()
    canvas = model_canvas(model, ids_with_masks, config, mask_id=mask_id, eos_id=eos_id, infill=True)
    return denoise(model, canvas, config)
