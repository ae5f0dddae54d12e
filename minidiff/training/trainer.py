"""The one training loop both train scripts use (docs/training.md, "The path of one step": micro-batch
seeds, the global batch's loss, resume, several processes).
References: MDLM (arXiv 2406.07524) and LLaDA (2502.09992) for the loss, Diffutron (2603.20466)
for the recipe; data parallelism with DistributedDataParallel.

    config = TrainConfig(lr=1e-4, batch_size=16, grad_accum=2, max_steps=1000, save_every=200)
    loss_fn = nelbo_objective(tok.mask_id, schedule=config.noise_schedule, loss_norm="sequence")
    result = train(model, train_batches, eval_batches, loss_fn, config, "runs/cpt", tokenizer=tok)
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minidiff import diffusion, optim
from minidiff.errors import UserError
from minidiff.plumbing import files
from minidiff.plumbing.device import Prefetcher, check_training_precision, enable_tf32, to_device, training_autocast
from minidiff.plumbing.distributed import DistContext, barrier, distributed_context
from minidiff.speed import chunked_loss
from minidiff.training import state as train_state
from minidiff.training.resume import MAY_DIFFER, Resumed, check_out_dir, resume
from minidiff.training.run_folder import RunWriter

EVAL_SEED_TAG = 0xE7A1  # separates evaluation seeds from training seeds


@dataclass
class TrainConfig:
    """Every knob of the loop, one flag per field; what --resume may change: each field's metadata (resume.py)."""
    lr: float = 1e-4                 # peak learning rate
    min_lr: float = 0.0              # learning rate at the end of the cosine decay
    warmup: int = 0                  # warmup steps (linear 0 -> lr); see warmup_ratio
    warmup_ratio: float = 0.0        # warmup as a fraction of the total steps (used when warmup == 0)
    max_steps: int | None = field(default=None, metadata=MAY_DIFFER)  # None: epochs * steps per epoch
    epochs: float | None = field(default=None, metadata=MAY_DIFFER)  # passes over the data (default 1)
    batch_size: int = 8              # sequences per micro-batch per process
    grad_accum: int = 1              # micro-batches per optimizer step
    weight_decay: float = 0.0        # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    clip: float = 1.0                # max global gradient norm; 0 disables clipping
    noise_schedule: str = "linear"   # masking (noise) schedule alpha_t: linear | cosine | loglinear
    loss_norm: str = "sequence"      # sequence (dllm) | token (MDLM)
    stratified_t: bool = False       # stratified times over the micro-batch (MDLM) instead of iid
    time_eps: float = 1e-3           # t = eps + (1 - eps) u
    seed: int = 0
    log_every: int = field(default=10, metadata=MAY_DIFFER)  # steps between metrics lines / bar updates
    eval_every: int = field(default=0, metadata=MAY_DIFFER)  # steps between evaluations (0: at start and end)
    save_every: int = field(default=1000, metadata=MAY_DIFFER)  # steps between checkpoints, one at the end (0: none)
    keep_last: int = field(default=2, metadata=MAY_DIFFER)  # checkpoints kept (older ones deleted)
    max_skipped_steps: int = field(default=5, metadata=MAY_DIFFER)  # non-finite steps in a row before a stop
    bf16: bool = field(default=True, metadata=MAY_DIFFER)  # bf16 autocast on CUDA (CPU always runs fp32)
    device: str | None = field(default=None, metadata=MAY_DIFFER)  # cpu | cuda | cuda:N (None: cuda:LOCAL_RANK or cpu)
    gradient_checkpointing: bool = field(default=False, metadata=MAY_DIFFER)
    resume: bool | str = field(default=False, metadata=MAY_DIFFER)
    allow_data_change: bool = field(default=False, metadata=MAY_DIFFER)  # --resume may continue on other data
    progress: bool = field(default=True, metadata=MAY_DIFFER)  # progress bar on rank 0 (plumbing.progress)


@dataclass
class TrainResult:
    step: int
    train_loss: float | None                           # mean loss of the last logged interval
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    out_dir: Path | None = None


def train(model, train_batches, eval_batches, loss_fn, config: TrainConfig, out_dir, *,
          tokenizer=None, lora: bool = False, base_model: str | None = None,
          run_info: dict | None = None, identity: dict | None = None) -> TrainResult:
    """Train `model` on `train_batches` (a batches.Batches) into `out_dir`, locked by rank 0. eval_batches:
    this rank's collated batches, or None; identity: what --resume compares (default: the weights hash)."""
    ctx = distributed_context(config.device)
    out = Path(out_dir)
    identity = identity if identity is not None else {"base_model": train_state.weights_hash(model)}
    with (files.lock_directory(out, "--out") if ctx.is_main else nullcontext()):
        resuming = check_out_dir(out, config.resume) is not None
        barrier(ctx)  # every rank has looked at DIR before rank 0 writes into it
        return _train_locked(model, train_batches, eval_batches, loss_fn, config, out, ctx, identity, resuming,
                             dict(tokenizer=tokenizer, lora=lora, base_model=base_model), run_info)


def _train_locked(model, train_batches, eval_batches, loss_fn, config: TrainConfig, out: Path, ctx: DistContext,
                  identity: dict, resuming: bool, export_args: dict, run_info: dict | None) -> TrainResult:
    steps = total_steps(config, train_batches, ctx.world_size)
    warmup = config.warmup or int(round(config.warmup_ratio * steps))  # --warmup, or --warmup-ratio of the run
    if warmup >= steps:
        raise UserError(f"warmup ({warmup} steps) must be shorter than the run ({steps} steps)")
    learner = make_learner(model, config, ctx, steps, warmup)
    if ctx.is_main:  # under the lock no save is in progress: temporaries are from killed ones
        files.remove_temporaries(out / "checkpoints", locked=True)
        files.remove_temporaries(out)
    start = resume(out / "checkpoints", learner, train_batches, config, ctx, steps, identity) if resuming else Resumed()
    writer = RunWriter(out, config, ctx, steps, start, identity)
    writer.start(warmup, run_info)
    if ctx.enabled:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        learner.ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    step = start.step
    if step == 0:
        evaluate_and_log(step, model, eval_batches, loss_fn, config, ctx, writer)
    batches = Prefetcher(train_batches, ctx.device)  # from here on the data position is the prefetcher's
    meter = LossMeter(ctx.device, start.skipped, start.skipped_in_a_row)
    last_loss = None
    while step < steps:
        result = optimizer_step(learner, batches, loss_fn, step, config, ctx)
        step += 1
        meter.add(result)
        meter.check(step, config, writer.ckpt_root)
        writer.advance()
        if step % config.log_every == 0 or step == steps:  # the one host read of the interval
            last_loss, tokens_per_s = meter.read()
            writer.log_train(step, last_loss, learner.lr_schedule.get_last_lr()[0], tokens_per_s,
                             batches.state_dict().get("epoch"), result.grad_norm, meter.skipped)
        with meter.paused():  # tokens/s counts training time only
            if config.eval_every and step % config.eval_every == 0 and step != steps:
                evaluate_and_log(step, model, eval_batches, loss_fn, config, ctx, writer)
            if config.save_every and (step % config.save_every == 0 or step == steps):
                writer.checkpoint(step, learner, batches.state_dict(), meter)
    evaluate_and_log(step, model, eval_batches, loss_fn, config, ctx, writer)
    writer.finish(model, **export_args)
    return TrainResult(step=step, train_loss=last_loss, eval_losses=writer.eval_losses, out_dir=out)


def total_steps(config: TrainConfig, train_batches, world_size: int = 1) -> int:
    if config.max_steps is not None:
        if config.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {config.max_steps}")
        return config.max_steps
    per_epoch = train_batches.steps_per_epoch // config.grad_accum
    if per_epoch == 0:
        raise UserError(f"too few training examples for one optimizer step: need batch size {config.batch_size} x "
                        f"grad accum {config.grad_accum} x {world_size} process(es) per step")
    return max(1, math.ceil((config.epochs or 1.0) * per_epoch))


@dataclass
class Learner:
    """What an optimiser step reads and changes."""
    model: torch.nn.Module           # the model being trained (checkpoints and evaluation use it)
    ddp_model: torch.nn.Module       # the same model, wrapped in DistributedDataParallel under torchrun
    params: list                     # its trainable parameters
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler   # warmup + cosine (optim.WarmupCosine)
    generator: torch.Generator       # the masking generator, reseeded before every micro-batch


def make_learner(model, config: TrainConfig, ctx: DistContext, steps: int, warmup: int) -> Learner:
    check_training_precision(ctx.device, config.bf16)
    enable_tf32(ctx.device)
    model.to(ctx.device)
    model.train()
    model.model.gradient_checkpointing = config.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.AdamW(optim.param_groups(model, config.weight_decay), lr=config.lr, eps=config.adam_eps,
                            betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)
    lr_schedule = optim.WarmupCosine(optimizer, warmup=warmup, total=steps, min_lr=config.min_lr)
    return Learner(model, model, params, optimizer, lr_schedule, torch.Generator(device=ctx.device))


def evaluate_and_log(step: int, model, eval_batches, loss_fn, config: TrainConfig, ctx: DistContext,
                     writer: RunWriter) -> None:
    if eval_batches is None:
        return
    value = evaluate(model, eval_batches, loss_fn, config, ctx)
    if value is not None and not math.isfinite(value):
        raise UserError(f"the evaluation loss is not finite at step {step}; the last good checkpoint is kept")
    writer.log_eval(step, value)


@torch.no_grad()
def evaluate(model, eval_batches: Iterable[dict], loss_fn, config: TrainConfig, ctx: DistContext) -> float | None:
    """Weighted mean loss over the eval batches of all ranks; batch i always draws the same masks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=ctx.device)  # [sum loss * weight, sum weight]
    generator = torch.Generator(device=ctx.device)
    for i, batch in enumerate(eval_batches):
        generator.manual_seed(derived_seed(config.seed, EVAL_SEED_TAG, ctx.rank, i))
        with training_autocast(ctx.device, config.bf16):
            loss, weight = loss_fn(model, to_device(batch, ctx.device), generator)
        sums += torch.stack([loss.float() * weight, weight])
    if ctx.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    total_loss, total_weight = sums.tolist()
    return total_loss / total_weight if total_weight > 0 else None


class LossMeter:
    """The training loss between two metrics lines, kept on the device, and the skipped (non-finite) steps."""

    def __init__(self, device: torch.device, skipped: int = 0, skipped_in_a_row: int = 0):
        self.loss = torch.zeros((), device=device)    # sum of step losses since the last read
        self.tokens = torch.zeros((), device=device)  # tokens trained on since the last read
        self.steps = 0
        self.skipped, self.skipped_in_a_row = skipped, skipped_in_a_row
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        if not result.finite:
            self.skipped += 1
            self.skipped_in_a_row += 1
            return
        self.skipped_in_a_row = 0
        self.loss += result.loss
        self.tokens += result.tokens
        self.steps += 1

    def check(self, step: int, config: TrainConfig, ckpt_root: Path) -> None:
        if self.skipped_in_a_row >= config.max_skipped_steps:
            first = step - self.skipped_in_a_row + 1
            raise UserError(f"the loss or gradient was non-finite (nan/inf) at every step from {first} to {step}; "
                            f"the run stopped and the last good checkpoint in {ckpt_root} is kept (try a lower --lr)")

    def read(self) -> tuple[float | None, float]:
        """(mean loss of the applied steps or None, tokens/s of training time) since the last read."""
        elapsed = time.perf_counter() - self.start
        mean_loss = float(self.loss) / self.steps if self.steps else None
        tokens_per_s = float(self.tokens) / max(elapsed, 1e-9)
        self.loss.zero_()
        self.tokens.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return mean_loss, tokens_per_s

    @contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) is not counted as training time."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused


@dataclass
class StepResult:
    loss: torch.Tensor         # the step's loss L (device scalar)
    tokens: torch.Tensor       # real tokens trained on (device scalar)
    grad_norm: torch.Tensor    # global gradient norm before clipping (device scalar)
    finite: bool               # L and the gradient norm were finite, so the update was applied


def optimizer_step(learner: Learner, batches, loss_fn, step: int, config: TrainConfig, ctx: DistContext) -> StepResult:
    """Optimiser step `step` (0-based) over grad_accum micro-batches per process; a step whose loss or
    gradient norm is not finite is skipped (the step's one host read, as torch.amp.GradScaler's)."""
    totals = torch.zeros(3, device=ctx.device)  # [sum loss * weight, sum weight, tokens]
    for a in range(config.grad_accum):
        batch = next(batches)  # already on the device (asynchronous copy from pinned memory)
        # the same seeds a single process would use for this slice of the global batch
        seed = derived_seed(config.seed, step, a * ctx.world_size + ctx.rank)
        learner.generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout (LoRA) draws from the global RNG
        with nullcontext() if (a == config.grad_accum - 1 or not ctx.enabled) else learner.ddp_model.no_sync():
            with training_autocast(ctx.device, config.bf16):
                loss, weight = loss_fn(learner.ddp_model, batch, learner.generator)
            # backprop loss_m * weight_m; divided by the global weight below
            (loss.float() * weight).backward()
        # totals += [loss_m weight_m, weight_m, tokens_m], all on the device (no sync)
        mask, ids = batch.get("attention_mask"), batch["input_ids"]  # tokens_m: the real ones, on the device
        tokens = mask.sum() if mask is not None else ids.new_full((), ids.numel())
        totals += torch.stack([loss.detach().float() * weight, weight.float(), tokens.float()])
    if ctx.enabled:
        dist.all_reduce(totals)  # DDP averaged the gradients over ranks: undo that below
    # grad = sum_m d(loss_m weight_m) / sum_m weight_m   (over all ranks)
    params = learner.params
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], ctx.world_size / totals[1])
    grad_norm = optim.clip_grad_norm(params, config.clip) if config.clip > 0 else optim.grad_norm(params)
    # L = sum_m loss_m weight_m / sum_m weight_m
    loss = totals[0] / totals[1]
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # the step's one host read
    if finite:
        learner.optimizer.step()
        learner.lr_schedule.step()
    learner.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, totals[2], grad_norm, finite)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def nelbo_objective(mask_id: int, *, schedule: str = "linear", loss_norm: str = "sequence",
                    stratified: bool = False, eps: float = 1e-3) -> Callable:
    """loss_fn(model, batch, generator) -> (loss, weight): the NELBO by the chunked vocabulary loss; weight:
    what the loss divided by. batch: input_ids [B, S], maskable [B, S] bool, optional attention_mask."""
    def loss_fn(model, batch, generator):
        maskable, attention_mask = batch["maskable"], batch.get("attention_mask")
        loss, _ = chunked_loss.nelbo_loss(model, batch["input_ids"], mask_id, maskable=maskable,
                                          attention_mask=attention_mask, schedule=schedule, normalize=loss_norm,
                                          stratified=stratified, eps=eps, generator=generator)
        return loss, diffusion.nelbo_normalizer(maskable, loss_norm, attention_mask)

    return loss_fn
