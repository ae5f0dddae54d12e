"""One block for a batch of requests, each row at its own block: one canvas, the fast loop's steps.

A row sees exactly the canvas its request alone sees (prompt | committed blocks | masks of its
later blocks; other rows are outside its attention mask) and takes the same steps per block, so
at temperature 0 its answer is generate's. Reader's page: docs/serving.md ("Batching at block
boundaries").
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from minidiff.data.chat import StopRules
from minidiff.sampler import Canvas, SamplerConfig, build_canvas, plan_block, random_generators, steps_per_block
from minidiff.speed.sampling import Denoiser, GenerateOutput

# the settings one block's steps read (plan_block, denoise_step, the caches, the compiled step)
STEP_FIELDS = ("temperature", "remasking", "stochastic", "cfg_scale", "repetition_penalty", "unmasking",
               "threshold", "cache", "cache_refresh", "compile")


def own_draws(config: SamplerConfig) -> bool:
    """Does this request need its own random generators (a seed, and draws that follow it)?"""
    draws = config.temperature > 0 or config.remasking == "random" or config.stochastic
    return draws and config.seed is not None


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

    @classmethod
    def start(cls, prompt: list[int], config: SamplerConfig, stops: StopRules, mask_id: int, device) -> "Row":
        n = config.max_new_tokens
        _, steps = steps_per_block(config.steps, n, config.block_length)
        generator, host = random_generators(config.seed, device) if own_draws(config) else (None, None)
        return cls(list(prompt), config, stops, [mask_id] * n, steps, 0, False, generator, host)

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
        self.answer = ids[0, len(self.prompt):].tolist()
        # a stop string with stop_at_eos off fills the rest: later blocks would take no step
        self.finished = stopped or self.last_block or canvas.mask_id not in self.answer
        self.block += 1


def batch_key(row: Row) -> tuple:
    """Rows with equal keys can share one block: same width, steps and step settings."""
    alone = id(row) if row.generator is not None else None
    return (row.width, row.steps, alone) + tuple(getattr(row.config, name) for name in STEP_FIELDS)


def batch_canvas(rows: list[Row], mask_id: int, eos_id: int, device) -> Canvas:
    """One canvas of the rows: row r is its prompt and answer so far, its one block its next."""
    lead = rows[0]
    prompts = [len(row.prompt) for row in rows]
    canvas = build_canvas([row.prompt + row.answer for row in rows], [row.block_start for row in rows],
                          lead.width, prompts, lead.config, mask_id=mask_id, eos_id=eos_id, device=device)
    span = torch.arange(canvas.ids.shape[1], device=device)[None, :]  # [1, T]
    # cfg's unconditional pass masks the prompt only, as on a run's canvas (built before any commit)
    in_prompt = span < torch.tensor(prompts, device=device)[:, None]  # [B, T]
    return replace(canvas, given=canvas.given & in_prompt, steps_per_block=lead.steps)


@torch.no_grad()
def denoise_block(model, rows: list[Row], mask_id: int, eos_id: int,
                  callback: Callable[[GenerateOutput], None] | None = None) -> None:
    """The next block of every row (one batch_key): its steps, then each row's stop rules."""
    lead = rows[0]
    device = next(iter(model.parameters()), torch.empty(0)).device
    canvas = batch_canvas(rows, mask_id, eos_id, device)
    denoiser = Denoiser(model, canvas, lead.config.replace(seed=None), None, callback)
    denoiser.generator = lead.generator  # None, or the lone row's own draws
    block = canvas.blocks[0]  # [B, K]
    plan = plan_block(canvas.ids, block, lead.steps, lead.config, mask_id, lead.host_generator)
    ids = denoiser.run_block(canvas.ids.clone(), 0, block, plan)  # [B, T]
    for r, row in enumerate(rows):
        row.end_block(ids[r:r + 1, :canvas.answer_end[r]], block[r:r + 1], canvas)


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
