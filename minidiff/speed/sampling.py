"""The fast block loop: minidiff/sampler.py's algorithm without the work a step does not need.
References: Fast-dLLM (arXiv 2505.22618: key/value caches, threshold decoding), LLaDA (2502.09992).
`generate` and `infill` run the blocks as `sampler.denoise` does, with `sampler.denoise_step`, and
commit the same tokens with cache="none" (tests/test_sampler.py). Its options are `FastOptions`;
`FastConfig` holds them with the algorithm's settings. What they add:

    logits only at the still-masked block positions   `_masked_first`, as many as the plan allows
    the key/value caches as the logits' source        kv_cache.BlockLogits (cache="prefix" | "dual")
    compile=True                                      `block_step` under torch.compile: bucketed
                                                      shapes, the numbers as tensors (StepNumbers)
    threshold decoding's count, read one step late    `LateCount` (cached or compiled loop)
    the stop rules after each block; a trace          data/chat.py StopRules; GenerateOutput
    length_bucket: each answer as alone               speed/invariance.py; `denoise_groups`
Reader's page: docs/sampler.md ("Why it is fast", "Key/value caches").
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch

from minidiff.data.chat import StopRules
from minidiff.errors import UserError
from minidiff.sampler import (
    FORK_STOP_STRINGS,
    BlockPlan,
    Canvas,
    SamplerConfig,
    denoise_step,
    model_canvas,
    plan_block,
    random_generators,
)
from minidiff.speed.invariance import PRODUCT_ROWS, exact_products, pad_to_bucket, share_keys
from minidiff.speed.kv_cache import BlockLogits


CACHES = ("none", "prefix", "dual")


@dataclass
class FastOptions:
    """The fast loop's own options (the algorithm's settings are SamplerConfig's)."""

    cache: str = "none"  # key/value caches (kv_cache.BlockLogits): "none" | "prefix" | "dual"
    cache_refresh: int | None = None  # refill them every n steps of a block (None: at its start only)
    compile: bool = False  # the compiled step (`compiled_block_step`)
    stop_strings: tuple[str, ...] = ()  # the fork's stop rule (data/chat.py StopRules; needs a tokenizer)
    stop_at_eos: bool = True  # StopRules: stop once every row has eos / [/Answer] in a finished block
    length_bucket: int = 16  # canvases padded to a multiple of it; only rows of one padded length share one

    def __post_init__(self) -> None:
        self.stop_strings = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        for name, ok, expected in [
            ("cache", self.cache in CACHES, f"one of {', '.join(CACHES)}"),
            ("cache_refresh", self.cache_refresh is None or (isinstance(self.cache_refresh, int)
                                                              and self.cache_refresh >= 1), "None or an integer >= 1"),
            ("stop_strings", all(isinstance(s, str) and s for s in self.stop_strings), "non-empty strings"),
            ("length_bucket", isinstance(self.length_bucket, int) and self.length_bucket >= 0, "an integer >= 0"),
        ]:
            if not ok:
                raise UserError(f"sampler config: {name} must be {expected}, got {getattr(self, name)!r}.")


@dataclass
class FastConfig(FastOptions, SamplerConfig):
    """The algorithm's settings and the fast loop's options together, as the scripts and the server
    pass them; the presets add the fork's stop strings."""

    PRESETS = {name: {**preset, "stop_strings": FORK_STOP_STRINGS} for name, preset in SamplerConfig.PRESETS.items()}

    def __post_init__(self) -> None:
        SamplerConfig.__post_init__(self)
        FastOptions.__post_init__(self)
        if self.compile and self.seed is not None and (self.temperature > 0 or self.remasking == "random"):
            raise UserError("sampler config: compile must be False with a seed and random draws, got True "
                            "(the compiled step's draws cannot follow a seed).")


def options_of(config: SamplerConfig) -> FastOptions:
    """The fast loop's options a config carries (a FastConfig), else the defaults."""
    return config if isinstance(config, FastOptions) else FastOptions()


@dataclass
class TraceStep:
    """One model call: the block positions it looked at and what was committed there."""

    block: int
    positions: torch.Tensor  # [B, N] the block's canvas positions the step looked at
    tokens: torch.Tensor  # [B, N] the ids there after the step
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
        return [row[s:e] for row, s, e in zip(self.sequences.tolist(), self.answer_start, self.answer_end)]

    def frames(self) -> list[list[list[int]]]:
        """The canvas of every row after each step (frame 0 = before the first step)."""
        ids, out = self.initial.clone(), [self.initial.tolist()]
        for step in self.trace:
            current = ids.gather(1, step.positions)
            ids.scatter_(1, step.positions, torch.where(step.committed, step.tokens, current))
            out.append(ids.tolist())
        return out


# ----------------------------------------------------------------------------- the step and the block loop


def most_left(plan: BlockPlan, i: int) -> int:
    """Masks left after i steps in the row with the most (threshold decoding: an upper bound)."""
    if plan.counts is None:
        return max(plan.masked)
    return max(m - sum(row[:i]) for m, row in zip(plan.masked, plan.counts))


def _masked_first(ids: torch.Tensor, block: torch.Tensor, width: int, mask_id: int) -> torch.Tensor:
    """[B, width]: each row's still-masked block positions first (in order), then committed ones."""
    committed = (ids.gather(1, block) != mask_id).to(torch.uint8)  # [B, K]
    order = committed.argsort(dim=1, stable=True)
    return block.gather(1, order[:, :width])


def block_step(logits_fn, ids: torch.Tensor, canvas: Canvas, block: torch.Tensor, counts: torch.Tensor | None,
               config: SamplerConfig, generator=None, logit_width: int | None = None, numbers=None):
    """`denoise_step` on the block [B, K], into new tensors: (ids [B, T], the positions it looked at
    [B, N], committed [B, N], masks left in the fullest row's block, 0-d); logits over the whole block
    (logit_width None: fixed shapes) or each row's first `logit_width` still-masked positions. No host
    read, no write into an input: torch.compile(fullgraph=True) captures it (`numbers`: denoise_step's)."""
    positions = block if logit_width is None else _masked_first(ids, block, logit_width, canvas.mask_id)
    ids = ids.clone()
    committed = denoise_step(logits_fn, ids, canvas, positions, counts, config, generator, numbers)
    left = (ids.gather(1, block) == canvas.mask_id).sum(1).amax()
    return ids, positions, committed, left


_COMPILED = {}
BUCKET = 64  # the compiled step's canvases are a multiple of this long, its batches a power of two
RECOMPILE_LIMIT = 64  # graphs per step: logits sources x step kinds x shape buckets (docs/sampler.md)


def compiled_block_step(device: torch.device):
    """block_step under torch.compile(fullgraph=True, dynamic=False); CUDA graphs on CUDA ("reduce-overhead")."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[mode] = torch.compile(block_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[mode]


class StepNumbers(NamedTuple):
    """A step's numbers as [B, 1, 1] tensors (threshold [B, 1]), the compiled step's inputs: one graph
    serves greedy and sampled requests, any penalty or threshold (T 0, penalty 1, top_k 0, top_p 1,
    threshold inf: off)."""

    cfg_scale: torch.Tensor
    temperature: torch.Tensor
    repetition_penalty: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    threshold: torch.Tensor

    @classmethod
    def of(cls, config: SamplerConfig, rows: int, device) -> "StepNumbers":
        threshold = math.inf if config.threshold is None else config.threshold
        values = (config.cfg_scale, config.temperature, config.repetition_penalty, config.top_k or 0, config.top_p)
        return cls(*(torch.full((rows, 1, 1), float(v), device=device) for v in values),
                   torch.full((rows, 1), float(threshold), device=device))


@functools.lru_cache(maxsize=None)
def _kind(cfg: bool, remasking: str, filtered: bool) -> SamplerConfig:
    # every stage a request may use switched on (the draw, the penalty, the threshold); StepNumbers
    # holds the numbers, so a stage left at its "off" number changes nothing
    return SamplerConfig(cfg_scale=float(cfg), remasking=remasking, top_k=1 if filtered else None,
                         temperature=1.0, repetition_penalty=2.0, threshold=1.0)


def step_kind(config: SamplerConfig) -> SamplerConfig:
    """What shapes the compiled graph besides its inputs: cfg on (a doubled batch), the remasking,
    top-k/top-p on; one object per kind, so that the graph's guards see the same values."""
    return _kind(config.cfg_scale > 0, config.remasking, bool(config.top_k) or config.top_p < 1)


def bucketed(canvas: Canvas, ids: torch.Tensor, block: torch.Tensor, plan: BlockPlan):
    """(canvas, ids, block, plan) padded to a power-of-two batch and a multiple of BUCKET positions.
    New rows hold eos only (nothing to fill, an ended answer) and see their first position; new
    positions are eos, hidden from every row; so no real row's tokens change."""
    B, T = ids.shape
    extra_rows, extra_cols = (1 << (B - 1).bit_length()) - B, -T % BUCKET

    def pad(x: torch.Tensor, value) -> torch.Tensor:  # [B, T] -> [B + extra_rows, T + extra_cols]
        return torch.nn.functional.pad(x, (0, extra_cols, 0, extra_rows), value=value)

    mask = pad(torch.ones_like(ids) if canvas.attention_mask is None else canvas.attention_mask, 0)
    mask[B:, 0] = 1
    padded = replace(canvas, ids=pad(canvas.ids, canvas.eos_id), attention_mask=mask,
                     given=pad(canvas.given.long(), 0).bool(), answer_start=canvas.answer_start + [0] * extra_rows,
                     answer_end=canvas.answer_end + [1] * extra_rows)
    counts = plan.counts_on_device
    counts = None if counts is None else torch.nn.functional.pad(counts, (0, 0, 0, extra_rows))  # [B', steps]
    block = torch.cat([block, block[:1].expand(extra_rows, -1)])  # [B', K]
    return padded, pad(ids, canvas.eos_id), block, replace(plan, counts_on_device=counts)


def source_length(block: torch.Tensor, length: int) -> int:
    """The canvas length BlockLogits sees: prefix mode's window (from the block's first position to
    the end) rounded up to a multiple of BUCKET, so that the compiled step sees few windows."""
    start = int(block[:, 0].min())
    return start + -(-(length - start) // BUCKET) * BUCKET


class LateCount:
    """A 0-d device count read on the host one step late: `push` starts a non-blocking copy (on CUDA
    on the current stream of the sampler's device), `read` waits for that copy only."""

    def __init__(self, device: torch.device):
        self.cuda, self.pending = device.type == "cuda", False
        self.host = torch.zeros((), dtype=torch.long)
        if self.cuda:
            self.host = self.host.pin_memory()
            self.stream, self.event = torch.cuda.current_stream(device), torch.cuda.Event()

    def push(self, count: torch.Tensor) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.host.copy_(count, non_blocking=True)
            self.event.record(self.stream)
        else:
            self.host.copy_(count)
        self.pending = True

    def read(self) -> int | None:
        if not self.pending:
            return None
        if self.cuda:
            self.event.synchronize()
        self.pending = False
        return int(self.host)


def _masks_left(late: LateCount | None, left: torch.Tensor, plan: BlockPlan) -> int:
    """Threshold decoding's masks left in the fullest row, on the host: at once (late None, a blocking
    read), or one step old from `late` (a block finished at step i gets a step i + 1 committing nothing)."""
    if late is None:
        return int(left)
    previous = late.read()  # None before the first push
    if previous == 0:
        return 0
    late.push(left)
    return max(plan.masked) if previous is None else previous


class Denoiser:
    """One generate/infill call: the blocks (`run`), each one's steps (`run_block`), each step (`step`)."""

    def __init__(self, model, canvas: Canvas, config: SamplerConfig, end_of_block, callback):
        self.model, self.canvas, self.config, self.options = model, canvas, config, options_of(config)
        self.end_of_block, self.callback = end_of_block, callback
        self.generator, self.host_generator = random_generators(config.seed, canvas.ids.device)
        self.compiled = compiled_block_step(canvas.ids.device) if self.options.compile else None
        # the cached / compiled loop reads threshold decoding's count one step late
        self.reads_late = self.options.cache != "none" or self.options.compile
        self.out = GenerateOutput(canvas.ids, 0, [], canvas.ids, list(canvas.answer_start), list(canvas.answer_end),
                                  canvas.mask_id)

    @torch.no_grad()
    def run(self) -> GenerateOutput:
        """Per block: plan it, run its steps, end it (the stop rules, if any)."""
        canvas, ids = self.canvas, self.canvas.ids.clone()  # the stop rules write into ids
        for b, block in enumerate(canvas.blocks):
            plan = plan_block(ids, block, canvas.steps_per_block, self.config, canvas.mask_id, self.host_generator)
            ids = self.run_block(ids, b, block, plan)
            if self.end_of_block is not None and self.end_of_block(ids, canvas, block, b + 1 == len(canvas.blocks)):
                if self.callback is not None:
                    self.callback(self.out)
                break
        self.out.sequences = ids
        return self.out

    def run_block(self, ids: torch.Tensor, b: int, block: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        """Block b's steps, while the host knows a row may still hold a mask; returns the new ids."""
        for ids in self.block_steps(ids, b, block, plan):
            pass
        return ids

    def block_steps(self, ids: torch.Tensor, b: int, block: torch.Tensor, plan: BlockPlan):
        """run_block one step at a time: yields the ids after each step (a caller may pause between)."""
        (rows, length), seen = ids.shape, ids.shape[1]
        self.current = self.canvas, self.config, None, rows, length
        if self.compiled is not None:  # the compiled step's few shapes, its numbers as tensors
            canvas, ids, block, plan = bucketed(self.canvas, ids, block, plan)
            numbers = StepNumbers.of(self.config, ids.shape[0], ids.device)
            self.current = canvas, step_kind(self.config), numbers, rows, length
            seen = source_length(block, ids.shape[1]) if self.options.cache == "prefix" else ids.shape[1]
        logits = BlockLogits(self.model, self.options, block, seen)
        late = LateCount(ids.device) if plan.counts is None and self.reads_late else None
        bound = most_left(plan, 0)  # masks left in the fullest row, or an upper bound of it
        for i in range(plan.num_steps):
            if plan.counts is not None:
                bound = most_left(plan, i)  # known on the host from the plan
            if bound == 0:
                break
            ids, left = self.step(ids, b, block, plan, i, logits, bound)
            if plan.counts is None:  # threshold decoding: the count is data-dependent
                bound = _masks_left(late, left, plan)
            yield ids[:rows, :length]

    def step(self, ids, b: int, block, plan: BlockPlan, i: int, logits: BlockLogits, bound: int):
        """Step i of block b, recorded: eager at the `bound` first still-masked positions, or compiled
        over the whole (bucketed) block with the numbers as tensors (a cache refresh runs eagerly)."""
        canvas, config, numbers, rows, length = self.current
        counts = None if plan.counts_on_device is None else plan.counts_on_device[:, i]  # [B]
        if numbers is not None:  # one layout (strides are guarded): threshold's "at least one" as a tensor
            counts = (torch.ones(ids.shape[0], dtype=torch.long, device=ids.device) if counts is None
                      else counts.clone(memory_format=torch.contiguous_format))
        step_fn = block_step if self.compiled is None or logits.refreshes(i) else self.compiled
        # a multiple of PRODUCT_ROWS positions per row: the head's product rounds a row as alone
        width = None if self.options.compile else min(-(-bound // PRODUCT_ROWS) * PRODUCT_ROWS, block.shape[1])
        generator = self.generator if numbers is None else None  # compiled draws follow no seed
        outputs = step_fn(logits.at_step(i), ids, canvas, block, counts, config, generator, width, numbers)
        if self.options.compile:  # copies: a CUDA graph reuses its output buffers at the next replay
            outputs = [t.clone() for t in outputs]
        ids, positions, committed, left = outputs
        self.out.sequences, self.out.num_forward = ids[:rows, :length], self.out.num_forward + 1
        self.out.trace.append(TraceStep(b, positions[:rows], ids.gather(1, positions)[:rows], committed[:rows]))
        if self.callback is not None:
            self.callback(self.out)
        return ids, left


# ----------------------------------------------------------------------------- generate and infill


def _checked_rows(model, items, new_tokens: int, mask_id, eos_id, what: str) -> list[list[int]]:
    """The sequences as lists of ids; UserError for ids or lengths the model cannot take."""
    if isinstance(items, torch.Tensor):
        items = items.tolist() if items.dim() == 2 else [items.tolist()]
    if not items:
        raise UserError(f"{what}: expected at least one sequence of token ids, got none.")
    rows = [item.tolist() if isinstance(item, torch.Tensor) else list(item) for item in items]
    if not all(isinstance(t, int) for row in rows for t in row):
        raise UserError(f"{what}: every sequence must be a list of integer token ids.")
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    for name, value in (("mask_id", mask_id), ("eos_id", eos_id)):
        if not isinstance(value, int) or not 0 <= value < vocab:
            raise UserError(f"{name} {value!r} is not a token id of the model's vocabulary of {vocab}.")
    total = max(len(r) for r in rows) + new_tokens
    if total > context:
        raise UserError(f"{what} needs {total} positions but the model's context "
                        f"(max_position_embeddings) is {context}; shorten it or lower max_new_tokens.")
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise UserError(f"{what} {i} contains token id {bad[0]} outside the model's vocabulary of {vocab}.")
    if total == 0:
        raise UserError("infill needs at least one token in a sequence.")
    return rows


def denoise_groups(model, rows: list[list[int]], make_canvas, spans: list[int], config: SamplerConfig,
                   end_of_block, callback) -> GenerateOutput:
    """The rows in groups that may share a canvas (invariance.share_keys; `spans`: the positions each
    row's blocks cover alone), each group's canvas make_canvas(its rows) padded to the length bucket
    and denoised as one; their outputs as make_canvas(rows)'s (callback after every step of any group)."""
    options, canvas = options_of(config), make_canvas(rows)
    keys = share_keys(canvas, config, options.length_bucket, exact_products(model), options.cache == "prefix")
    groups: dict[tuple, list[int]] = {}
    for r, key in enumerate(keys):
        groups.setdefault(key + (spans[r],) if key else key, []).append(r)
    if len(groups) == 1:  # every row together, as one canvas
        part = Denoiser(model, pad_to_bucket(canvas, options.length_bucket), config, end_of_block, callback).run()
        return _cropped(part, canvas.ids.shape[1])
    whole = GenerateOutput(canvas.ids.clone(), 0, [], canvas.ids, list(canvas.answer_start), list(canvas.answer_end),
                           canvas.mask_id)
    for index in groups.values():
        group = pad_to_bucket(make_canvas([rows[r] for r in index]), options.length_bucket)
        chosen = torch.tensor(index, device=canvas.ids.device)
        merge = functools.partial(_merge, whole, chosen, whole.num_forward, callback)
        part = Denoiser(model, group, config, end_of_block, merge).run()
        merge(part)
        whole.trace += [_widened(step, chosen, len(rows)) for step in part.trace]
    return whole


def _merge(whole: GenerateOutput, rows: torch.Tensor, calls_before: int, callback, part: GenerateOutput) -> None:
    """A group's output (rows `rows` of the whole) into the whole output, then the caller's callback."""
    width = min(whole.sequences.shape[1], part.sequences.shape[1])
    whole.sequences[rows, :width] = part.sequences[:, :width]
    whole.num_forward = calls_before + part.num_forward
    if callback is not None:
        callback(whole)


def _widened(step: TraceStep, rows: torch.Tensor, B: int) -> TraceStep:
    """A group's trace step as the whole batch's: other rows look at position 0 and commit nothing."""
    full = [torch.zeros(B, *t.shape[1:], dtype=t.dtype, device=t.device).index_copy_(0, rows, t)
            for t in (step.positions, step.tokens, step.committed)]  # each [B, N]
    return TraceStep(step.block, *full)


def _cropped(out: GenerateOutput, width: int) -> GenerateOutput:
    """The output without the length bucket's padding: sequences and the initial canvas [B, width]."""
    return replace(out, sequences=out.sequences[:, :width], initial=out.initial[:, :width])


def generate(model, prompts, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int, tokenizer=None,
             pad_id: int | None = None, callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """`max_new_tokens` after each prompt (token-id lists): sequences [B, max prompt + max_new_tokens]
    (eos-padded), model calls, a trace. Options (caches, compile, stop rules, the length bucket): a
    FastConfig's, else FastOptions(); stop strings and "[/Answer]" need a `tokenizer`. With a length
    bucket each answer is the prompt's alone, bit for bit. `callback(out)` runs after every step."""
    config = config or SamplerConfig()
    rows = _checked_rows(model, prompts, config.max_new_tokens, mask_id, eos_id, "prompt")
    stops = StopRules.make(options_of(config), tokenizer, pad_id, eos_id)
    make = functools.partial(model_canvas, model, config=config, mask_id=mask_id, eos_id=eos_id, infill=False)
    return denoise_groups(model, rows, make, [config.max_new_tokens] * len(rows), config, stops.end_of_block, callback)


def infill(model, ids_with_masks, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int, tokenizer=None,
           pad_id: int | None = None, callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """Fill every mask of the given sequences (masks may sit anywhere). Blocks of `block_length` tile
    the whole (eos-padded) sequence from position 0, each with ceil(steps / num_blocks) steps (at most
    a block's width). No stop rule applies and `max_new_tokens`, `tokenizer` and `pad_id` are unused."""
    config = config or SamplerConfig()
    rows = _checked_rows(model, ids_with_masks, 0, mask_id, eos_id, "sequence")
    make = functools.partial(model_canvas, model, config=config, mask_id=mask_id, eos_id=eos_id, infill=True)
    return denoise_groups(model, rows, make, [len(row) for row in rows], config, None, callback)
