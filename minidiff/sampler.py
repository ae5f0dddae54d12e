"""The block sampler Diffutron used (dllm's LLaDA generator + the authors' fork), made fast.

References: LLaDA (arXiv 2502.09992: semi-autoregressive blocks, low-confidence remasking),
Fast-dLLM (2505.22618: threshold decoding), Diffutron (2603.20466: settings). Matches LLaDA's
`generate.py`, dllm's LLaDA sampler (`core/samplers`) and the Diffutron fork (repetition
penalty, stop strings) token for token at temperature 0. Reader's page: docs/sampler.md.

Canvas: [prompt | max_new_tokens x <mask>], rows right-padded with eos. The answer is cut into
blocks of `block_length`, aligned to each row's own prompt end, and denoised left to right;
every block gets ceil(steps / num_blocks) steps, at most as many as it has positions
(`steps_per_block`). One step (docs/sampler.md):

    1. logits at the block's positions   (cfg > 0: un + (cfg + 1) * (cond - un), with the
                                          unconditional canvas = prompt replaced by masks)
    2. repetition penalty                 l <- l / p if l > 0 else l * p, for every id present in
                                          the row's canvas except mask and eos, at every position
    3. candidate                          argmax l (T = 0) or argmax exp(l) / (-log u)^T, float64
                                          (= a sample of softmax(l / T), the Gumbel-max trick)
    4. confidence                         softmax(l)[candidate] ("low_confidence") or U(0, 1)
    5. only still-masked positions of the current block compete
    6. commit the k most confident       k from the unmasking schedule; never re-masked
                                          (threshold decoding: every candidate with
                                          confidence >= threshold, at least one)
After each block: the fork's stop strings end the answer, and the loop stops early once every
row has emitted eos or "[/Answer]" (nothing after a finished block can change the answer).

The code in reading order: `build_canvas` (generate and infill differ only in the rows and the
block starts they give it), then `Denoiser.run`, which per block calls `plan_block` (the
unmasking schedule's counts), `Denoiser.run_block` (`block_step` until the block is filled) and
`StopRules.end_of_block`.

Speed: the encoder runs on the whole canvas (attention is bidirectional) but the MLM head and
the vocabulary projection only at the block's still-masked positions (how many are left is known
on the host from the block's plan), and a step makes no host-device synchronisation (the plan is
computed on the host once per block), so the step can be captured by CUDA graphs /
torch.compile. Threshold decoding reads one number per step (its step count depends on the
data).

One step loop serves every sampler; what differs is where a step's logits come from
(`cached.BlockLogits`: the model on the whole canvas, or the approximate key/value caches
`cache="prefix"|"dual"` of Fast-dLLM, arXiv 2505.22618) and whether `block_step` runs compiled
(`compile=True`: logits over the whole block, one shape per block). The cached or compiled loop
reads threshold decoding's count one step late (`LateCount`); `cache="none"` without compile is
the exact sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from minidiff.data.chat import END_OF_TURN, FORK_STOP_REPLACEMENT, FORK_STOP_STRINGS
from minidiff.errors import UserError
from minidiff.plumbing.device import model_device
from minidiff.speed.kv_cache import BlockLogits

REMASKING = ("low_confidence", "random")
UNMASKING = ("dllm", "llada")  # unmasking schedules: how many tokens each step commits
CACHES = ("none", "prefix", "dual")


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
    stop_strings: tuple[str, ...] = ()  # the fork's rule; needs a tokenizer
    stop_at_eos: bool = True  # stop once every row has eos / [/Answer] in a finished block
    seed: int | None = None  # for temperature > 0, random remasking and stochastic unmasking
    cache: str = "none"  # "none" (exact) | "prefix" | "dual": approximate key/value cache (cached.py)
    cache_refresh: int | None = None  # refill the cache every n steps of a block (None: block start only)
    compile: bool = False  # torch.compile the fixed-shape step (cached.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"),
            (isinstance(self.steps, int) and self.steps >= 1,
             f"steps must be an integer >= 1, got {self.steps!r}"),
            (isinstance(self.block_length, int) and self.block_length >= 1,
             f"block_length must be an integer >= 1, got {self.block_length!r}"),
            (self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be a finite number >= 0, got {self.temperature!r}"),
            (self.remasking in REMASKING,
             f"remasking must be one of {', '.join(REMASKING)}, got {self.remasking!r}"),
            (self.unmasking in UNMASKING,
             f"unmasking (the unmasking schedule) must be one of {', '.join(UNMASKING)}, "
             f"got {self.unmasking!r}"),
            (not (self.stochastic and self.unmasking == "llada"),
             "stochastic unmasking draws Binomial counts and only exists for the unmasking schedule 'dllm'"),
            (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale),
             f"cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"),
            (self.threshold is None or 0 < self.threshold <= 1,
             f"threshold must be None or a confidence in (0, 1], got {self.threshold!r}"),
            (all(isinstance(s, str) and s for s in self.stop_strings),
             f"stop_strings must be non-empty strings, got {self.stop_strings!r}"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             f"seed must be None or an integer in [0, 2^63), got {self.seed!r}"),
            (self.cache in CACHES,
             f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}"),
            (self.cache_refresh is None or (isinstance(self.cache_refresh, int) and self.cache_refresh >= 1),
             f"cache_refresh must be None or an integer >= 1, got {self.cache_refresh!r}"),
            (not (self.compile and self.seed is not None and
                  (self.temperature > 0 or self.remasking == "random")),
             "compile draws its random numbers inside the compiled step, so it cannot follow a seed; "
             "drop the seed, or compile, or use temperature 0 with low_confidence remasking"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"sampler config: {message}.")

    PRESETS = {
        # Diffutron's model-card settings (2603.20466) with the fork's penalty and stop strings
        "diffutron-long": dict(max_new_tokens=128, steps=128, block_length=32, temperature=0.1,
                               repetition_penalty=1.2, stop_strings=FORK_STOP_STRINGS),
        "diffutron-short": dict(max_new_tokens=64, steps=64, block_length=32, temperature=0.1,
                                repetition_penalty=1.2, stop_strings=FORK_STOP_STRINGS),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "SamplerConfig":
        if name not in cls.PRESETS:
            raise UserError(f"unknown sampler preset {name!r}; expected one of {', '.join(cls.PRESETS)}.")
        return cls(**{**cls.PRESETS[name], **overrides})

    def replace(self, **changes) -> "SamplerConfig":
        return replace(self, **changes)


@dataclass
class TraceStep:
    """One model call: the block positions it looked at and what was committed there."""

    block: int
    positions: torch.Tensor  # [B, N] the canvas positions of the current block the step looked at
    tokens: torch.Tensor  # [B, N] the ids at those positions after the step
    committed: torch.Tensor  # [B, N] bool, True where a token was committed in this step


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T] long, right-padded with eos
    num_forward: int  # model calls made (a cfg step's doubled batch is one call)
    trace: list[TraceStep] = field(default_factory=list)
    initial: torch.Tensor | None = None  # [B, T] the canvas before the first step
    answer_start: list[int] = field(default_factory=list)  # per row: where the answer begins
    answer_end: list[int] = field(default_factory=list)  # per row: end of the canvas it owns
    mask_id: int | None = None

    def answers(self) -> list[list[int]]:
        """Each row's generated ids (the canvas from the prompt end to the row's end)."""
        rows = self.sequences.tolist()
        return [row[s:e] for row, s, e in zip(rows, self.answer_start, self.answer_end)]

    def frames(self) -> list[list[list[int]]]:
        """The canvas of every row after each step (frame 0 = before the first step)."""
        ids = self.initial.clone()
        out = [ids.tolist()]
        for step in self.trace:
            current = ids.gather(1, step.positions)
            ids.scatter_(1, step.positions, torch.where(step.committed, step.tokens, current))
            out.append(ids.tolist())
        return out


# ----------------------------------------------------------------------------- unmasking schedules


def _dllm_reverse_keep(s: float, t: float) -> float:
    # dllm LinearAlphaScheduler.reverse_mask_prob(s, t) = (1 - alpha(s)) / (1 - alpha(t)),
    # alpha(t) = 1 - t, evaluated in float32 exactly as dllm does (this decides the ties)
    s32, t32 = torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    return float((1 - (1 - s32)) / (1 - (1 - t32)))


def transfer_counts(masked: int, steps: int, unmasking: str = "dllm", *, stochastic: bool = False,
                    generator: torch.Generator | None = None) -> list[int]:
    """How many of `masked` tokens each step reveals; steps that would reveal 0 are dropped.

    dllm: at step j (of N) reveal round(m_left * (1 - s/t)), s = (N-j-1)/N, t = (N-j)/N, i.e.
    round(m_left / (N - j)) half-to-even, but with dllm's float32 arithmetic (which breaks some
    exact .5 ties downwards, e.g. m=4, N=3 -> [1, 1, 2]); stochastic: Binomial(m_left, 1 - s/t).
    llada: m // N each step, the first m % N steps one more.
    """
    if unmasking == "llada":
        base, extra = divmod(masked, steps)
        counts = [base + (1 if j < extra else 0) for j in range(steps)]
        return [c for c in counts if c > 0]
    counts, left = [], masked
    for j in range(steps):
        if left == 0:
            break
        s, t = (steps - j - 1) / steps, (steps - j) / steps
        reveal_prob = 1 - _dllm_reverse_keep(s, t)
        if stochastic:
            n = torch.tensor([float(left)], dtype=torch.float64)
            p = torch.tensor([reveal_prob], dtype=torch.float64)
            count = int(torch.binomial(n, p, generator=generator)[0])
        else:
            count = int(torch.round(torch.tensor(left, dtype=torch.float64) * reveal_prob))
        count = min(count, left)
        counts.append(count)
        left -= count
    return [c for c in counts if c > 0]


@dataclass
class BlockPlan:
    """One block's unmasking plan, made on the host once at the block's start."""

    masked: list[int]  # per row: masks in the block
    counts: list[list[int]] | None  # per row: tokens each step commits (None: threshold decoding)
    counts_on_device: torch.Tensor | None  # [B, num_steps] the same counts, on the canvas's device
    num_steps: int

    def most_left(self, i: int) -> int:
        """Masks left after i steps in the row with the most (threshold decoding: an upper bound)."""
        if self.counts is None:
            return max(self.masked)
        return max(m - sum(row[:i]) for m, row in zip(self.masked, self.counts))


def plan_block(ids: torch.Tensor, block: torch.Tensor, steps: int, config: SamplerConfig,
               mask_id: int, host_generator=None) -> BlockPlan:
    """Masks left in the block [B, K] per row -> how many each of its steps commits (host, no
    step reads). Each row's counts are compacted and right-padded with zeros (dllm's layout)."""
    masked = (ids.gather(1, block) == mask_id).sum(1).tolist()
    if config.threshold is not None:
        return BlockPlan(masked, None, None, max(masked))  # at least one commit per step
    rows = [transfer_counts(m, steps, config.unmasking, stochastic=config.stochastic,
                            generator=host_generator) for m in masked]
    width = max((len(r) for r in rows), default=0)
    counts = [r + [0] * (width - len(r)) for r in rows]
    on_device = torch.tensor(counts, dtype=torch.long, device=ids.device).reshape(len(counts), width)
    return BlockPlan(masked, counts, on_device, width)


def _masked_first(ids: torch.Tensor, block: torch.Tensor, width: int, mask_id: int) -> torch.Tensor:
    """[B, width]: each row's still-masked block positions first (in order), then committed ones."""
    committed = (ids.gather(1, block) != mask_id).to(torch.uint8)  # [B, K]
    order = committed.argsort(dim=1, stable=True)
    return block.gather(1, order[:, :width])


# ----------------------------------------------------------------------------- one step


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float,
                             mask_id: int, eos_id: int) -> torch.Tensor:
    """logits [B, K, V]; every id present in a row's canvas ids [B, T] (except mask, eos) is
    penalised: l / p where l > 0, l * p elsewhere, at every position of the row."""
    # only the <= T ids on the canvas change: gather them, penalise, scatter back (duplicates of an
    # id write the same value), instead of a pass over all V logits
    B, K, V = logits.shape
    present = ids[:, None, :].expand(B, K, ids.shape[1])  # [B, K, T]
    values = logits.gather(-1, present)
    exempt = (present == mask_id) | (present == eos_id)
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    return logits.scatter(-1, present, torch.where(exempt, values, penalised))  # [B, K, V]


def denoise_step(logits_fn, ids: torch.Tensor, canvas: Canvas, positions: torch.Tensor,
                 counts: torch.Tensor | None, config: SamplerConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One denoising step, in place on `ids` [B, T]; returns the committed mask [B, K].

    logits_fn(ids, attention_mask, positions) -> [B, K, V]: the model (`logits_at_positions`) or a
    cached view (cached.py). positions [B, K]: the block positions the step looks at; counts [B]:
    how many to commit per row (ignored with a threshold); canvas: the attention mask, the given
    tokens (cfg's unconditional pass masks them), mask and eos. Pure tensor work: no .item(),
    .tolist() or Python branch on tensor values.
    """
    B, K = positions.shape
    mask_id, eos_id = canvas.mask_id, canvas.eos_id
    if config.cfg_scale > 0:
        unconditional = ids.masked_fill(canvas.given, mask_id)
        both_mask = None if canvas.attention_mask is None else canvas.attention_mask.repeat(2, 1)
        both = torch.cat([ids, unconditional])  # [2B, T]
        logits = logits_fn(both, both_mask, positions.repeat(2, 1)).float()  # [2B, K, V]
        cond, uncond = logits.chunk(2)
        # l = un + (cfg + 1) (cond - un)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)  # [B, K, V]
    else:
        logits = logits_fn(ids, canvas.attention_mask, positions).float()  # [B, K, V]
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ids, config.repetition_penalty, mask_id, eos_id)

    if config.temperature > 0:
        # Gumbel-max in float64: argmax exp(l) / (-log u)^T  ==  a draw from softmax(l / T)
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        candidates = (logits.double().exp() / (-noise.log()) ** config.temperature).argmax(-1)
    else:
        candidates = logits.argmax(-1)  # [B, K]

    if config.remasking == "low_confidence":
        # confidence = softmax(l)[candidate], untempered
        confidence = logits.softmax(-1).gather(-1, candidates[..., None]).squeeze(-1)  # [B, K]
    else:
        confidence = torch.rand((B, K), device=logits.device, generator=generator)

    current = ids.gather(1, positions)  # [B, K]
    masked = current == mask_id
    confidence = confidence.masked_fill(~masked, -math.inf)

    # rank of each position by confidence within its row (0 = most confident)
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=order.device).expand(B, K))
    if config.threshold is not None:
        # commit every candidate with confidence >= threshold, and at least the most confident
        commit = masked & ((confidence >= config.threshold) | (rank == 0))
    else:
        commit = masked & (rank < counts[:, None])  # the k most confident
    ids.scatter_(1, positions, torch.where(commit, candidates, current))
    return commit


# ----------------------------------------------------------------------------- inputs and stop rules


def _check_model_inputs(model, rows: list[list[int]], total_length: int, mask_id, eos_id, what: str):
    vocab = model.config.vocab_size
    for name, value in (("mask_id", mask_id), ("eos_id", eos_id)):
        if not isinstance(value, int) or not 0 <= value < vocab:
            raise UserError(f"{name} {value!r} is not a token id of the model's vocabulary of {vocab}.")
    context = model.config.max_position_embeddings
    if total_length > context:
        raise UserError(f"{what} needs {total_length} positions but the model's context "
                        f"(max_position_embeddings) is {context}; shorten it or lower max_new_tokens.")
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise UserError(f"{what} {i} contains token id {bad[0]} outside the model's vocabulary of {vocab}.")


def _as_rows(items, what: str) -> list[list[int]]:
    if isinstance(items, torch.Tensor):
        items = items.tolist() if items.dim() == 2 else [items.tolist()]
    if not items:
        raise UserError(f"{what}: expected at least one sequence of token ids, got none.")
    rows = []
    for item in items:
        item = item.tolist() if isinstance(item, torch.Tensor) else list(item)
        if not all(isinstance(t, int) for t in item):
            raise UserError(f"{what}: every sequence must be a list of integer token ids.")
        rows.append(item)
    return rows


def _find_stop(tokenizer, ids: list[int], stop_strings) -> int | None:
    """Index into ids of the first token where any stop string begins (decoded text), or None."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return None
    char = min(hits)
    for n in range(len(ids) + 1):  # the first prefix whose text reaches past the stop's start
        if len(tokenizer.decode(ids[:n], skip_special_tokens=False)) > char:
            return max(n - 1, 0)
    return len(ids)


def _ended(tokenizer, ids: list[int], eos_id: int, pad_id: int) -> bool:
    """Has this answer ended? eos, pad (SFT trains the model to emit padding after the answer,
    docs/training.md) or the end-of-turn string."""
    if eos_id in ids or pad_id in ids:
        return True
    return tokenizer is not None and END_OF_TURN in tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class StopRules:
    """What ends the answers, checked once per block on the host: the fork's stop strings (cut,
    replaced by the end-of-turn `replacement`, then padding) and the early stop once every row
    has ended (`stop_at_eos`)."""

    stop_strings: tuple[str, ...]
    stop_at_eos: bool
    tokenizer: object | None  # decodes the answers (stop strings, "[/Answer]"); None: eos and pad only
    pad_id: int  # what SFT pads answers with
    replacement: list[int] | None  # the ids of FORK_STOP_REPLACEMENT; None: no stop strings

    @classmethod
    def make(cls, config: SamplerConfig, tokenizer, pad_id: int | None, eos_id: int) -> "StopRules":
        replacement = None
        if config.stop_strings and tokenizer is not None:
            replacement = tokenizer.encode(FORK_STOP_REPLACEMENT, add_special_tokens=False)
        # the pad id: given, else the tokenizer's, else eos
        pad_id = getattr(tokenizer, "pad_id", None) if pad_id is None else pad_id
        return cls(config.stop_strings, config.stop_at_eos, tokenizer, eos_id if pad_id is None else pad_id,
                   replacement)

    def cut_at_stop_string(self, ids, r: int, row: list[int], start: int, end: int, answer_end: int) -> bool:
        """The fork's rule, in place on row r (whose ids are `row`): from the first stop string in
        row[start:end] to the row's answer end, write the end-of-turn replacement, then pad."""
        cut = _find_stop(self.tokenizer, row[start:end], self.stop_strings)
        if cut is None:
            return False
        first = start + cut
        fill = (self.replacement + [self.pad_id] * answer_end)[: answer_end - first]
        ids[r, first:answer_end] = torch.tensor(fill, dtype=ids.dtype, device=ids.device)
        return True

    def end_of_block(self, ids, canvas: Canvas, block, last: bool) -> bool:
        """After the block [B, K], in place on ids [B, T]: cut at stop strings, then the early
        stop (the rest of every answer padded with eos). True: stop now."""
        if not (self.replacement is not None or self.stop_at_eos):
            return False
        block_end, rows = block[:, -1].tolist(), ids.tolist()
        finished = []
        for r, (row, start, answer_end) in enumerate(zip(rows, canvas.answer_start, canvas.answer_end)):
            end = min(block_end[r] + 1, answer_end)
            if self.replacement is not None and self.cut_at_stop_string(ids, r, row, start, end, answer_end):
                row = ids[r].tolist()
            finished.append(_ended(self.tokenizer, row[start:end], canvas.eos_id, self.pad_id) or
                            (self.replacement is not None and canvas.mask_id not in row[start:answer_end]))
        if not (self.stop_at_eos and all(finished) and not last):
            return False
        # the rest of every answer is padding (masks a prompt may hold stay as they are)
        span = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, T]
        answers = ((span >= torch.tensor(canvas.answer_start, device=ids.device)[:, None]) &
                   (span < torch.tensor(canvas.answer_end, device=ids.device)[:, None]))  # [B, T]
        ids.masked_fill_(answers & (ids == canvas.mask_id), canvas.eos_id)
        return True


# ----------------------------------------------------------------------------- the canvas


@dataclass
class Canvas:
    """What the block loop denoises, built once by `build_canvas` for generate and infill."""

    ids: torch.Tensor  # [B, T] long, before the first step (never written): each row's tokens
    #                    (masks to fill), right-padded with eos
    attention_mask: torch.Tensor | None  # [B, T] each row's own positions; None: every row fills T
    given: torch.Tensor  # [B, T] bool: the given tokens, which cfg's unconditional pass masks
    blocks: list[torch.Tensor]  # one [B, K] tensor of canvas positions per block, left to right
    steps_per_block: int  # ceil(steps / number of blocks), at most the widest block (steps_per_block)
    answer_start: list[int]  # per row: where its answer (what the sampler fills) begins
    answer_end: list[int]  # per row: the end of the canvas it owns
    mask_id: int  # the token the sampler fills
    eos_id: int  # the padding of shorter rows


def steps_per_block(steps: int, span: int, block_length: int) -> tuple[int, int]:
    """(asked, used): ceil(steps / number of blocks) for `span` positions in blocks of
    `block_length`, and that capped at the widest block, min(block_length, span).

    A block of m masks never needs more than m steps: for any number of steps >= m both
    unmasking schedules commit one token per step (tests/test_sampler.py enumerates it), so the
    cap changes no token, only how long the plan's loop runs (a billion steps ran for ever).
    Stochastic counts are drawn over the capped number of steps."""
    asked = math.ceil(steps / math.ceil(span / block_length))
    return asked, min(asked, block_length, span)


def build_canvas(rows: list[list[int]], block_starts: list[int], span: int, answer_start: list[int],
                 config: SamplerConfig, *, mask_id: int, eos_id: int, device) -> Canvas:
    """The canvas of `rows` (token ids, <mask> where the sampler fills) and its blocks: block b
    covers block_starts[r] + [b L, min((b + 1) L, span)) in row r (L = block_length)."""
    lengths = [len(r) for r in rows]
    B, T, L = len(rows), max(lengths), config.block_length
    ids = torch.full((B, T), eos_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : lengths[r]] = torch.tensor(row, dtype=torch.long)
    ids = ids.to(device)  # [B, T]
    # attention over each row's own positions, never its padding
    attention_mask = None
    if len(set(lengths)) > 1:
        attention_mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
    # cfg's unconditional pass masks the given tokens (the fork: those that are not eos)
    given = (ids != mask_id) & (ids != eos_id)  # [B, T]
    num_blocks = math.ceil(span / L)
    starts = torch.tensor(block_starts, dtype=torch.long, device=device)[:, None]  # [B, 1]
    blocks = [starts + torch.arange(b * L, min((b + 1) * L, span), device=device)[None, :]
              for b in range(num_blocks)]  # each [B, K]
    _, steps = steps_per_block(config.steps, span, L)
    return Canvas(ids, attention_mask, given, blocks, steps, list(answer_start), lengths, mask_id, eos_id)


# ----------------------------------------------------------------------------- the loop


def block_step(logits_fn, ids: torch.Tensor, canvas: Canvas, block: torch.Tensor,
               counts: torch.Tensor | None, config: SamplerConfig, generator=None,
               logit_width: int | None = None):
    """`denoise_step` on the block [B, K], returning new tensors: (ids [B, T], the positions it
    looked at [B, N], committed [B, N], masks left in the fullest row's block, 0-d).

    logit_width None: logits over the whole block (fixed shapes: committed positions cannot be
    chosen, their confidence is -inf); else over each row's first `logit_width` still-masked
    block positions, padded with committed ones. No host read and no write into an input, so
    torch.compile(fullgraph=True) captures it."""
    positions = block if logit_width is None else _masked_first(ids, block, logit_width, canvas.mask_id)
    ids = ids.clone()
    committed = denoise_step(logits_fn, ids, canvas, positions, counts, config, generator)
    left = (ids.gather(1, block) == canvas.mask_id).sum(1).amax()
    return ids, positions, committed, left


_COMPILED = {}


def compiled_block_step(device: torch.device):
    """block_step under torch.compile(fullgraph=True); CUDA graphs on CUDA ("reduce-overhead")."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(block_step, fullgraph=True, mode=mode)
    return _COMPILED[mode]


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


def _masks_left(late: LateCount | None, left: torch.Tensor, plan: BlockPlan) -> int:
    """Threshold decoding's host number after a step: the masks left in the fullest row. At once
    (late None: one blocking read per step), or one step old from `late` (the device never waits;
    a block that finished at step i gets a step i + 1, which commits nothing)."""
    if late is None:
        return int(left)
    previous = late.read()  # None before the first push
    if previous == 0:
        return 0
    late.push(left)
    return max(plan.masked) if previous is None else previous


class Denoiser:
    """One generate/infill call: the blocks left to right (`run`), each one's steps
    (`run_block`, the one step loop of the exact, the cached and the compiled sampler)."""

    def __init__(self, model, canvas: Canvas, config: SamplerConfig, stops: StopRules, callback):
        self.model, self.canvas, self.config = model, canvas, config
        self.stops, self.callback = stops, callback
        device = canvas.ids.device
        self.generator, self.host_generator = _generators(config.seed, device)
        self.compiled = compiled_block_step(device) if config.compile else None
        # the cached / compiled loop reads threshold decoding's count one step late
        self.reads_late = config.cache != "none" or config.compile
        self.out = GenerateOutput(canvas.ids, 0, [], canvas.ids, list(canvas.answer_start),
                                  list(canvas.answer_end), canvas.mask_id)

    @torch.no_grad()
    def run(self) -> GenerateOutput:
        """Per block: plan it, run its steps, end it (stop strings, early stop)."""
        canvas, ids = self.canvas, self.canvas.ids.clone()  # the stop rules write into ids
        for b, block in enumerate(canvas.blocks):
            plan = plan_block(ids, block, canvas.steps_per_block, self.config, canvas.mask_id,
                              self.host_generator)
            ids = self.run_block(ids, b, block, plan)
            if self.stops.end_of_block(ids, canvas, block, last=b + 1 == len(canvas.blocks)):
                if self.callback is not None:
                    self.callback(self.out)
                break
        self.out.sequences = ids
        return self.out

    def run_block(self, ids: torch.Tensor, b: int, block: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """Block b's steps; returns the new ids [B, T]. Eager: logits only at as many positions as
        the host knows may still be masked (from the plan, or threshold decoding's count);
        compiled: over the whole block (one shape per block), a refresh eagerly."""
        config = self.config
        logits = BlockLogits(self.model, config, block, ids.shape[1])
        late = LateCount(ids.device) if plan.counts is None and self.reads_late else None
        bound = plan.most_left(0)  # masks left in the fullest row, or an upper bound of it
        for i in range(plan.num_steps):
            if plan.counts is not None:
                bound = plan.most_left(i)  # known on the host from the plan
            if bound == 0:
                break
            counts = None if plan.counts_on_device is None else plan.counts_on_device[:, i]  # [B]
            step = block_step if self.compiled is None or logits.refreshes(i) else self.compiled
            outputs = step(logits.at_step(i), ids, self.canvas, block, counts, config, self.generator,
                           None if config.compile else bound)
            if config.compile:  # copies: a CUDA graph reuses its output buffers at the next replay
                outputs = [t.clone() for t in outputs]
            ids, positions, committed, left = outputs
            self.record(b, ids, positions, committed)
            if plan.counts is None:  # threshold decoding: the count is data-dependent
                bound = _masks_left(late, left, plan)
        return ids

    def record(self, b: int, ids: torch.Tensor, positions: torch.Tensor, committed: torch.Tensor) -> None:
        """Count one model call of block b, add it to the trace, show it to the callback."""
        self.out.sequences = ids
        self.out.num_forward += 1
        self.out.trace.append(TraceStep(b, positions, ids.gather(1, positions), committed))
        if self.callback is not None:
            self.callback(self.out)


def _generators(seed: int | None, device):
    """(generator of the step's draws on the device, host generator of stochastic counts)."""
    if seed is None:
        return None, None
    return torch.Generator(device=device).manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def generate(model, prompts, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int,
             tokenizer=None, pad_id: int | None = None,
             callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """Generate `max_new_tokens` after each prompt (list of token-id lists, lengths may differ).

    Returns sequences [B, max prompt + max_new_tokens] (right-padded with eos), the number of
    model calls and a per-step trace. `tokenizer` enables stop strings and the "[/Answer]" early
    stop; `callback(out)` is called after every step (for live views; it may sync).
    """
    config = config or SamplerConfig()
    rows = _as_rows(prompts, "prompt")
    lengths, n_new = [len(r) for r in rows], config.max_new_tokens
    _check_model_inputs(model, rows, max(lengths) + n_new, mask_id, eos_id, "prompt")
    # canvas = [prompt | max_new_tokens x mask | eos padding], blocks aligned to each prompt's end
    canvas = build_canvas([row + [mask_id] * n_new for row in rows], lengths, n_new, lengths, config,
                          mask_id=mask_id, eos_id=eos_id, device=model_device(model))
    return Denoiser(model, canvas, config, StopRules.make(config, tokenizer, pad_id, eos_id), callback).run()


def infill(model, ids_with_masks, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int,
           tokenizer=None, pad_id: int | None = None,
           callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """Fill every mask of the given sequences (masks may sit anywhere).

    Blocks of `block_length` tile the whole (eos-padded) sequence from position 0; each gets
    ceil(steps / num_blocks) steps (at most a block's width). `config.max_new_tokens` is not used.
    """
    config = config or SamplerConfig()
    rows = _as_rows(ids_with_masks, "sequence")
    lengths = [len(r) for r in rows]
    T = max(lengths)
    _check_model_inputs(model, rows, T, mask_id, eos_id, "sequence")
    if T == 0:
        raise UserError("infill needs at least one token in a sequence.")
    first_mask = [row.index(mask_id) if mask_id in row else n for row, n in zip(rows, lengths)]
    canvas = build_canvas(rows, [0] * len(rows), T, first_mask, config, mask_id=mask_id,
                          eos_id=eos_id, device=model_device(model))
    # no early stop and no stop strings: the given text is the user's, eos in it ends nothing
    config = replace(config, stop_at_eos=False, stop_strings=())
    return Denoiser(model, canvas, config, StopRules.make(config, tokenizer, pad_id, eos_id), callback).run()


__all__ = ["SamplerConfig", "GenerateOutput", "TraceStep", "generate", "infill", "denoise_step",
           "transfer_counts", "apply_repetition_penalty", "FORK_STOP_STRINGS", "build_canvas",
           "plan_block", "block_step", "steps_per_block"]
