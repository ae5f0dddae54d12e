"""The block sampler Diffutron used (dllm's LLaDA generator + the authors' fork), made fast.

References: LLaDA (arXiv 2502.09992: semi-autoregressive blocks, low-confidence remasking),
Fast-dLLM (2505.22618: threshold decoding), Diffutron (2603.20466: settings). Matches LLaDA's
`generate.py`, dllm's LLaDA sampler (`core/samplers`) and the Diffutron fork (repetition
penalty, stop strings) token for token at temperature 0. Reader's page: docs/sampler.md.

Canvas: [prompt | max_new_tokens x <mask>], rows right-padded with eos. The answer is cut into
blocks of `block_length`, aligned to each row's own prompt end, and denoised left to right;
every block gets ceil(steps / num_blocks) steps. One step (docs/sampler.md):

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

Speed: the encoder runs on the whole canvas (attention is bidirectional) but the MLM head and
the vocabulary projection only at the block's still-masked positions (`logits_at`; how many are
left is known on the host from the schedule), and a step makes no host-device synchronisation
(the schedule is computed on the host once per block), so the step can be captured by CUDA
graphs / torch.compile. Threshold decoding reads one number per step (its step count depends on
the data).

`cache="prefix"|"dual"` (approximate key/value caches, Fast-dLLM arXiv 2505.22618) and
`compile=True` run the blocks with the fixed-shape step of `cached.py` instead; `cache="none"`
without compile is the exact loop here, unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .errors import UserError

REMASKING = ("low_confidence", "random")
UNMASKING = ("dllm", "llada")  # unmasking schedules: how many tokens each step commits
CACHES = ("none", "prefix", "dual")
FORK_STOP_STRINGS = ("<s>", "</s>", "<|USER|>", "|USER|>")
END_OF_TURN = "[/Answer]"
FORK_STOP_REPLACEMENT = "\n[/Answer]\n"


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
    unmasking: str = "dllm"  # unmasking schedule. "dllm": round(m_left / (N - j)) | "llada": m // N, first m % N get +1
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
    positions: torch.Tensor  # [B, K] canvas positions of the current block
    tokens: torch.Tensor  # [B, K] the canvas at those positions after the step
    committed: torch.Tensor  # [B, K] bool, True where a token was committed in this step


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
        canvas = self.initial.clone()
        out = [canvas.tolist()]
        for step in self.trace:
            current = canvas.gather(1, step.positions)
            canvas.scatter_(1, step.positions, torch.where(step.committed, step.tokens, current))
            out.append(canvas.tolist())
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


def _schedule_rows(masked_per_row: Sequence[int], steps: int, config: SamplerConfig,
                   generator) -> list[list[int]]:
    """Per-row counts, each row compacted and right-padded with zeros (dllm's layout)."""
    rows = [transfer_counts(m, steps, config.unmasking, stochastic=config.stochastic,
                            generator=generator) for m in masked_per_row]
    width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]


def _schedule_tensor(rows: list[list[int]], device) -> torch.Tensor:
    width = len(rows[0]) if rows else 0
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), width)


def _masked_first(canvas: torch.Tensor, positions: torch.Tensor, width: int, mask_id: int) -> torch.Tensor:
    """[B, width]: each row's still-masked block positions first (in order), then committed ones."""
    committed = (canvas.gather(1, positions) != mask_id).to(torch.uint8)  # [B, K]
    order = committed.argsort(dim=1, stable=True)
    return positions.gather(1, order[:, :width])


# ----------------------------------------------------------------------------- one step


def apply_repetition_penalty(logits: torch.Tensor, canvas: torch.Tensor, penalty: float,
                             mask_id: int, eos_id: int) -> torch.Tensor:
    """logits [B, K, V]; every id present in a row's canvas [B, T] (except mask, eos) is penalised:
    l / p where l > 0, l * p elsewhere, at every position of the row."""
    # only the <= T ids on the canvas change: gather them, penalise, scatter back (duplicates of an
    # id write the same value), instead of a pass over all V logits
    B, K, V = logits.shape
    ids = canvas[:, None, :].expand(B, K, canvas.shape[1])  # [B, K, T]
    values = logits.gather(-1, ids)
    exempt = (ids == mask_id) | (ids == eos_id)
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    return logits.scatter(-1, ids, torch.where(exempt, values, penalised))  # [B, K, V]


def denoise_step(model, canvas: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor, counts: torch.Tensor | None, given: torch.Tensor | None,
                 config: SamplerConfig, mask_id: int, eos_id: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One denoising step, in place on `canvas` [B, T]; returns the committed mask [B, K].

    positions [B, K]: the current block's canvas positions per row; counts [B]: how many to
    commit per row (ignored with a threshold); given [B, T]: positions the cfg unconditional
    pass masks. Pure tensor work: no .item(), .tolist() or Python branch on tensor values.
    """
    B, K = positions.shape
    if config.cfg_scale > 0:
        unconditional = canvas.masked_fill(given, mask_id)
        both_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
        logits = model(torch.cat([canvas, unconditional]), both_mask,
                       logits_at=positions.repeat(2, 1)).float()  # [2B, K, V]
        cond, uncond = logits.chunk(2)
        # l = un + (cfg + 1) (cond - un)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)  # [B, K, V]
    else:
        logits = model(canvas, attention_mask, logits_at=positions).float()  # [B, K, V]
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, canvas, config.repetition_penalty, mask_id, eos_id)

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

    current = canvas.gather(1, positions)  # [B, K]
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
    canvas.scatter_(1, positions, torch.where(commit, candidates, current))
    return commit


# ----------------------------------------------------------------------------- the loop


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


def _run_block(model, out, b, canvas, attention_mask, positions, masked, plan, schedule, num_steps,
               given, config, mask_id, eos_id, generator, callback) -> None:
    """The exact steps of block b, in place on canvas, with logits only at still-masked positions."""
    left = list(masked)  # per row, masks left in the block (known on the host)
    for i in range(num_steps):
        # logits only where they can be used: the block's still-masked positions, as many
        # as the row with the most masks left (the others are padded with committed ones)
        width = max(left)
        if width == 0:
            break
        where = _masked_first(canvas, positions, width, mask_id)  # [B, width]
        counts = None if schedule is None else schedule[:, i]
        commit = denoise_step(model, canvas, attention_mask, where, counts, given, config,
                              mask_id, eos_id, generator)
        out.num_forward += 1
        out.trace.append(TraceStep(b, where, canvas.gather(1, where), commit))
        if callback is not None:
            callback(out)
        if schedule is not None:
            left = [m - c[i] for m, c in zip(left, plan)]
        else:  # threshold decoding: the count is data-dependent, one host read per step
            left = (canvas.gather(1, positions) == mask_id).sum(1).tolist()


@torch.no_grad()
def _denoise(model, canvas, attention_mask, given, blocks, steps_per_block, config, *, mask_id,
             eos_id, pad_id, tokenizer, answer_start, answer_end, callback) -> GenerateOutput:
    """Run the blocks. blocks: list of [B, K] position tensors (one per block)."""
    device = canvas.device
    generator = None
    host_generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
        host_generator = torch.Generator().manual_seed(config.seed + 1)
    out = GenerateOutput(canvas, 0, [], canvas.clone(), list(answer_start), list(answer_end), mask_id)
    replacement = None
    if config.stop_strings and tokenizer is not None:
        replacement = tokenizer.encode(FORK_STOP_REPLACEMENT, add_special_tokens=False)

    static = None
    if config.cache != "none" or config.compile:
        from .cached import StaticSteps  # the cached / compiled fixed-shape step

        static = StaticSteps(model, config, mask_id, eos_id)
    for b, positions in enumerate(blocks):
        # once per block (host): masks left in this block per row -> the transfer schedule
        masked = (canvas.gather(1, positions) == mask_id).sum(1).tolist()
        if config.threshold is None:
            plan = _schedule_rows(masked, steps_per_block, config, host_generator)
            schedule = _schedule_tensor(plan, device)  # [B, n]
            num_steps = schedule.shape[1]
        else:
            plan, schedule, num_steps = None, None, max(masked)  # at least one commit per step
        if static is not None:
            canvas = static.run_block(out, b, canvas, attention_mask, positions, masked, plan, schedule,
                                      num_steps, given, generator, callback)
        else:
            _run_block(model, out, b, canvas, attention_mask, positions, masked, plan, schedule,
                       num_steps, given, config, mask_id, eos_id, generator, callback)

        # once per block (host): the fork's stop strings, then the early stop
        if not (replacement is not None or config.stop_at_eos):
            continue
        block_end = positions[:, -1].tolist()
        rows = canvas.tolist()
        finished = []
        for r, row in enumerate(rows):
            start, end = answer_start[r], min(block_end[r] + 1, answer_end[r])
            if replacement is not None:
                cut = _find_stop(tokenizer, row[start:end], config.stop_strings)
                if cut is not None:
                    first = start + cut
                    fill = (replacement + [pad_id] * answer_end[r])[: answer_end[r] - first]
                    canvas[r, first:answer_end[r]] = torch.tensor(fill, dtype=canvas.dtype, device=device)
                    row = canvas[r].tolist()
            finished.append(_ended(tokenizer, row[start:end], eos_id, pad_id) or
                            (replacement is not None and mask_id not in row[start:answer_end[r]]))
        if config.stop_at_eos and all(finished) and b + 1 < len(blocks):
            # the rest of every answer is padding (masks a prompt may hold stay as they are)
            span = torch.arange(canvas.shape[1], device=device)[None, :]
            answers = (span >= torch.tensor(answer_start, device=device)[:, None]) & (
                span < torch.tensor(answer_end, device=device)[:, None])
            canvas.masked_fill_(answers & (canvas == mask_id), eos_id)
            if callback is not None:
                callback(out)
            break
    out.sequences = canvas
    return out


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


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
    lengths = [len(r) for r in rows]
    T = max(lengths) + config.max_new_tokens
    _check_model_inputs(model, rows, T, mask_id, eos_id, "prompt")
    device = _model_device(model)
    B, L, n_new = len(rows), config.block_length, config.max_new_tokens

    # canvas = [prompt | max_new_tokens x mask | eos padding]
    canvas = torch.full((B, T), eos_id, dtype=torch.long)
    for r, row in enumerate(rows):
        canvas[r, : lengths[r]] = torch.tensor(row, dtype=torch.long)
        canvas[r, lengths[r]: lengths[r] + n_new] = mask_id
    canvas = canvas.to(device)
    ends = [n + n_new for n in lengths]
    # attention over each row's own positions (prompt + answer), never its padding
    attention_mask = None
    if len(set(lengths)) > 1:
        attention_mask = (torch.arange(T)[None, :] < torch.tensor(ends)[:, None]).long().to(device)
    # cfg's unconditional pass masks the given prompt tokens (the fork: those that are not eos)
    given = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(device) & (canvas != eos_id)

    # blocks aligned to each row's prompt end: block b covers prompt_len + [b L, min((b+1) L, n))
    num_blocks = math.ceil(n_new / L)
    steps_per_block = math.ceil(config.steps / num_blocks)
    starts = torch.tensor(lengths, device=device)[:, None]
    blocks = [starts + torch.arange(b * L, min((b + 1) * L, n_new), device=device)[None, :]
              for b in range(num_blocks)]  # each [B, K]
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_id", None)
        pad_id = eos_id if pad_id is None else pad_id
    return _denoise(model, canvas, attention_mask, given, blocks, steps_per_block, config,
                    mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, tokenizer=tokenizer,
                    answer_start=lengths, answer_end=ends, callback=callback)


def infill(model, ids_with_masks, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int,
           tokenizer=None, pad_id: int | None = None,
           callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """Fill every mask of the given sequences (masks may sit anywhere).

    Blocks of `block_length` tile the whole (eos-padded) sequence from position 0; each gets
    ceil(steps / num_blocks) steps. `config.max_new_tokens` is not used.
    """
    config = config or SamplerConfig()
    rows = _as_rows(ids_with_masks, "sequence")
    lengths = [len(r) for r in rows]
    T = max(lengths)
    _check_model_inputs(model, rows, T, mask_id, eos_id, "sequence")
    if T == 0:
        raise UserError("infill needs at least one token in a sequence.")
    device = _model_device(model)
    B, L = len(rows), config.block_length
    canvas = torch.full((B, T), eos_id, dtype=torch.long)
    for r, row in enumerate(rows):
        canvas[r, : lengths[r]] = torch.tensor(row, dtype=torch.long)
    canvas = canvas.to(device)
    attention_mask = None
    if len(set(lengths)) > 1:
        attention_mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
    given = (canvas != mask_id) & (canvas != eos_id)
    num_blocks = math.ceil(T / L)
    steps_per_block = math.ceil(config.steps / num_blocks)
    blocks = [torch.arange(b * L, min((b + 1) * L, T), device=device)[None, :].expand(B, -1).contiguous()
              for b in range(num_blocks)]
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_id", None)
        pad_id = eos_id if pad_id is None else pad_id
    # no early stop and no stop strings: the given text is the user's, eos in it ends nothing
    config = replace(config, stop_at_eos=False, stop_strings=())
    first_mask = [row.index(mask_id) if mask_id in row else n for row, n in zip(rows, lengths)]
    return _denoise(model, canvas, attention_mask, given, blocks, steps_per_block, config,
                    mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, tokenizer=tokenizer,
                    answer_start=first_mask, answer_end=lengths, callback=callback)


__all__ = ["SamplerConfig", "GenerateOutput", "TraceStep", "generate", "infill", "denoise_step",
           "transfer_counts", "apply_repetition_penalty", "FORK_STOP_STRINGS"]
