"""One block for a batch of requests, each row at its own block: one canvas, the fast loop's steps.

A row sees exactly the canvas its request alone sees (prompt | committed blocks | masks of its
later blocks | its suffix, if any; other rows are outside its attention mask) and takes the same
steps per block; padded to a length bucket, its arithmetic is its own alone (`invariant_key`). A
block runs a step at a time (`BlockRun.advance`), so that groups take turns. Reader's page:
docs/serving.md ("Batching", "Batch invariance").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from minidiff.data.chat import StopRules
from minidiff.model import model_device
from minidiff.sampler import Canvas, SamplerConfig, build_canvas, plan_block, random_generators, steps_per_block
from minidiff.speed.invariance import own_draws, pad_to_bucket, row_key
from minidiff.speed.sampling import Denoiser, GenerateOutput

# the settings one block's steps read (plan_block, denoise_step, the caches, the compiled step)
STEP_FIELDS = ("temperature", "remasking", "stochastic", "cfg_scale", "repetition_penalty", "unmasking",
               "threshold", "top_k", "top_p", "cache", "cache_refresh", "compile")


@dataclass
class Row:
    """One request as the batcher sees it; `answer` changes at block boundaries only."""
    prompt: list[int]
    config: SamplerConfig
    stops: StopRules
    answer: list[int]  # [max_new_tokens] the committed blocks, then <mask>
    steps: int  # steps per block over the whole answer, as the request alone runs them
    block: int = 0  # the next block to denoise
    finished: bool = False
    generator: torch.Generator | None = None  # the step's draws, when it has its own (own_draws)
    host_generator: torch.Generator | None = None  # stochastic counts, likewise
    suffix: list[int] = field(default_factory=list)  # given after the answer: the answer fills the middle

    @classmethod
    def start(cls, prompt: list[int], config: SamplerConfig, stops: StopRules, mask_id: int, device,
              suffix: list[int] = ()) -> "Row":
        n = config.max_new_tokens
        _, steps = steps_per_block(config.steps, n, config.block_length)
        generator, host = random_generators(config.seed, device) if own_draws(config) else (None, None)
        return cls(list(prompt), config, stops, [mask_id] * n, steps, 0, False, generator, host, list(suffix))

    @property
    def tokens(self) -> int:
        """The positions of its canvas."""
        return len(self.prompt) + len(self.answer) + len(self.suffix)

    @property
    def width(self) -> int:
        """The positions of its next block (the last one may be shorter)."""
        length = self.config.block_length
        return min(length, len(self.answer) - self.block * length)

    @property
    def block_start(self) -> int:
        """The canvas position where its next block begins."""
        return len(self.prompt) + self.block * self.config.block_length

    @property
    def last_block(self) -> bool:
        return (self.block + 1) * self.config.block_length >= len(self.answer)

    def end_block(self, ids: torch.Tensor, block: torch.Tensor, canvas: Canvas) -> None:
        """After its block: ids [1, own length] (a view into the batch's canvas) through the stop
        rules as its request alone sees them; then the answer so far and whether it is done."""
        alone = replace(canvas, ids=ids, attention_mask=None, blocks=[block],
                        answer_start=[len(self.prompt)], answer_end=[ids.shape[1]])
        stopped = self.stops.end_of_block(ids, alone, block, self.last_block)
        self.answer = ids[0, len(self.prompt):len(self.prompt) + len(self.answer)].tolist()
        # a stop string with stop_at_eos off fills the rest: later blocks would take no step
        self.finished = stopped or self.last_block or canvas.mask_id not in self.answer
        self.block += 1


def batch_key(row: Row) -> tuple:
    """Rows with equal keys can share one block: same width, steps and step settings."""
    alone = id(row) if row.generator is not None else None
    return (row.width, row.steps, alone) + tuple(getattr(row.config, name, None) for name in STEP_FIELDS)


def invariant_key(row: Row, bucket: int, exact_products: bool) -> tuple:
    """What rows must share besides batch_key so that a row's logits are its own alone, bit for bit:
    invariance.row_key for its next block (the key holds the row's id where it must run alone)."""
    if not bucket:
        return ()
    length, window, alone = row_key(row.tokens, [row.block_start], [row.width], bucket, exact_products,
                                    row.config.cache == "prefix")
    return length, window, id(row) if alone else None


def batch_canvas(rows: list[Row], mask_id: int, eos_id: int, device, bucket: int = 0) -> Canvas:
    """One canvas of the rows: row r is its prompt, answer so far and suffix, its one block its next;
    padded to the length bucket (invariance.pad_to_bucket)."""
    lead = rows[0]
    prompts = [len(row.prompt) for row in rows]
    canvas = build_canvas([row.prompt + row.answer + row.suffix for row in rows], [row.block_start for row in rows],
                          lead.width, prompts, lead.config, mask_id=mask_id, eos_id=eos_id, device=device)
    canvas = pad_to_bucket(canvas, bucket)  # the same padding and mask kernel alone as in any batch
    span = torch.arange(canvas.ids.shape[1], device=device)[None, :]  # [1, T]
    # cfg's unconditional pass masks what was given (prompt, suffix) only, as on a run's canvas
    start = torch.tensor(prompts, device=device)[:, None]  # [B, 1]
    end = start + torch.tensor([len(row.answer) for row in rows], device=device)[:, None]
    return replace(canvas, given=canvas.given & ((span < start) | (span >= end)), steps_per_block=lead.steps)


class BlockRun:
    """The next block of every row of one batch_key, run a step at a time (`advance`)."""

    def __init__(self, model, rows: list[Row], mask_id: int, eos_id: int,
                 callback: Callable[[GenerateOutput], None] | None = None, bucket: int = 0):
        lead = rows[0]
        device = model_device(model)
        self.rows, self.canvas = rows, batch_canvas(rows, mask_id, eos_id, device, bucket)
        denoiser = Denoiser(model, self.canvas, lead.config.replace(seed=None), None, callback)
        denoiser.generator = lead.generator  # None, or the lone row's own draws
        self.block = self.canvas.blocks[0]  # [B, K]
        plan = plan_block(self.canvas.ids, self.block, lead.steps, lead.config, mask_id, lead.host_generator)
        self.ids = self.canvas.ids.clone()  # [B, T]
        self.steps = denoiser.block_steps(self.ids, 0, self.block, plan)

    @torch.no_grad()
    def advance(self, pause: Callable[[], bool] = lambda: False) -> bool:
        """Steps until pause() after one (False) or the block's end (True: each row's stop rules ran)."""
        for self.ids in self.steps:
            if pause():
                return False
        for r, row in enumerate(self.rows):
            row.end_block(self.ids[r:r + 1, :self.canvas.answer_end[r]], self.block[r:r + 1], self.canvas)
        return True


def step_callback(rows: list[Row], traced: list[int], send: Callable[[int, list[int], list[int]], None]):
    """A Denoiser callback: after every step, send(r, answer ids, answer offsets committed by the
    step) for each traced row r (a host read per step: only when a row is traced)."""
    def callback(out: GenerateOutput) -> None:
        step = out.trace[-1]
        for r in traced:
            start = len(rows[r].prompt)
            ids = out.sequences[r, start:start + len(rows[r].answer)].tolist()
            new = [p - start for p, c in zip(step.positions[r].tolist(), step.committed[r].tolist()) if c]
            send(r, ids, new)
    return callback
