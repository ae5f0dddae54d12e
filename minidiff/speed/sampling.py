"""The fast block loop: minidiff/sampler.py's algorithm without the work a step does not need.
References: Fast-dLLM (arXiv 2505.22618: key/value caches, threshold decoding), LLaDA (2502.09992).
`generate` and `infill` run the blocks as `sampler.denoise` does, with `sampler.denoise_step`, and
commit the same tokens with cache="none" (tests/test_sampler.py). What they add:

    logits only at the still-masked block positions   `_masked_first`, as many as the plan allows
    the key/value caches as the logits' source        kv_cache.BlockLogits (cache="prefix" | "dual")
    compile=True                                      `block_step` (fixed shapes) under torch.compile
    threshold decoding's count, read one step late    `LateCount` (cached or compiled loop)
    the stop rules after each block; a trace          data/chat.py StopRules; GenerateOutput
Reader's page: docs/sampler.md ("Why it is fast", "Key/value caches").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from minidiff.data.chat import StopRules
from minidiff.errors import UserError
from minidiff.sampler import BlockPlan, Canvas, SamplerConfig, denoise_step, model_canvas, plan_block, random_generators
from minidiff.speed.kv_cache import BlockLogits


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
               config: SamplerConfig, generator=None, logit_width: int | None = None):
    """`denoise_step` on the block [B, K], into new tensors: (ids [B, T], the positions it looked at
    [B, N], committed [B, N], masks left in the fullest row's block, 0-d); logits over the whole block
    (logit_width None: fixed shapes) or each row's first `logit_width` still-masked positions. No host
    read, no write into an input: torch.compile(fullgraph=True) captures it."""
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
        self.model, self.canvas, self.config = model, canvas, config
        self.end_of_block, self.callback = end_of_block, callback
        self.generator, self.host_generator = random_generators(config.seed, canvas.ids.device)
        self.compiled = compiled_block_step(canvas.ids.device) if config.compile else None
        # the cached / compiled loop reads threshold decoding's count one step late
        self.reads_late = config.cache != "none" or config.compile
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
        logits = BlockLogits(self.model, self.config, block, ids.shape[1])
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
        return ids

    def step(self, ids, b: int, block, plan: BlockPlan, i: int, logits: BlockLogits, bound: int):
        """Step i of block b, recorded: eager at the `bound` first still-masked positions, or compiled
        over the whole block (one shape per block; a cache refresh runs eagerly)."""
        config = self.config
        counts = None if plan.counts_on_device is None else plan.counts_on_device[:, i]  # [B]
        step_fn = block_step if self.compiled is None or logits.refreshes(i) else self.compiled
        width = None if config.compile else bound
        outputs = step_fn(logits.at_step(i), ids, self.canvas, block, counts, config, self.generator, width)
        if config.compile:  # copies: a CUDA graph reuses its output buffers at the next replay
            outputs = [t.clone() for t in outputs]
        ids, positions, committed, left = outputs
        self.out.sequences, self.out.num_forward = ids, self.out.num_forward + 1
        self.out.trace.append(TraceStep(b, positions, ids.gather(1, positions), committed))
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


def generate(model, prompts, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int, tokenizer=None,
             pad_id: int | None = None, callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """`max_new_tokens` after each prompt (token-id lists): sequences [B, max prompt + max_new_tokens]
    (eos-padded), model calls, a trace. Stop rules: `config.stop_at_eos`; with a `tokenizer`,
    `config.stop_strings` and "[/Answer]". `callback(out)` runs after every step (it may sync)."""
    config = config or SamplerConfig()
    rows = _checked_rows(model, prompts, config.max_new_tokens, mask_id, eos_id, "prompt")
    canvas = model_canvas(model, rows, config, mask_id=mask_id, eos_id=eos_id, infill=False)
    stops = StopRules.make(config, tokenizer, pad_id, eos_id)
    return Denoiser(model, canvas, config, stops.end_of_block, callback).run()


def infill(model, ids_with_masks, config: SamplerConfig | None = None, *, mask_id: int, eos_id: int, tokenizer=None,
           pad_id: int | None = None, callback: Callable[[GenerateOutput], None] | None = None) -> GenerateOutput:
    """Fill every mask of the given sequences (masks may sit anywhere). Blocks of `block_length` tile
    the whole (eos-padded) sequence from position 0, each with ceil(steps / num_blocks) steps (at most
    a block's width). No stop rule applies and `max_new_tokens`, `tokenizer` and `pad_id` are unused."""
    config = config or SamplerConfig()
    rows = _checked_rows(model, ids_with_masks, 0, mask_id, eos_id, "sequence")
    canvas = model_canvas(model, rows, config, mask_id=mask_id, eos_id=eos_id, infill=True)
    return Denoiser(model, canvas, config, None, callback).run()
