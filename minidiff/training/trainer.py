"""The one training loop both train scripts use (docs/training.md, "The path of one step").

References: MDLM (arXiv 2406.07524) and LLaDA (2502.09992) for the loss, Diffutron (2603.20466)
for the recipe; data parallelism with DistributedDataParallel.

    config = TrainConfig(lr=1e-4, batch_size=16, grad_accum=2, max_steps=1000, save_every=200)
    loss_fn = nelbo_objective(tok.mask_id, schedule=config.noise_schedule, loss_norm="sequence")
    result = train(model, train_batches, eval_batches, loss_fn, config, "runs/cpt", tokenizer=tok)

One optimizer step = `grad_accum` micro-batches on each of `world_size` processes; a loss function
returns (loss_m, weight_m), and the step's loss is the global batch's (one all-reduce per step):

    L = sum_m loss_m * weight_m / sum_m weight_m        (m over all micro-batches of all ranks)

Micro-batch m of step s is seeded from (seed, s, m), so a resumed or data-parallel run draws the
masks of one uninterrupted process.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minidiff import __version__, diffusion, optim
from minidiff.errors import UserError
from minidiff.lora import base_state_dict
from minidiff.plumbing import files, peft_io, progress
from minidiff.plumbing.checkpoint import save_pretrained
from minidiff.plumbing.device import (Prefetcher, check_available, check_training_precision, enable_tf32,
                                      resolve_device, to_device, training_autocast)
from minidiff.speed import chunked_loss
from minidiff.training import state as train_state

EVAL_SEED_TAG = 0xE7A1  # separates evaluation seeds from training seeds


# What --resume may change is declared on each config field, field(metadata=...); a field without
# it (of TrainConfig or a script's config) must equal the checkpoint's. Paths may change because
# what they hold is compared by content (the run's identity); the run length is compared as total steps.
ON_RESUME = "on_resume"
MAY_DIFFER = {ON_RESUME: "may differ"}  # logging, intervals, device, paths, run length
DATA = {ON_RESUME: "data"}  # how the data is read, shaped and mixed: may differ under --allow-data-change


@dataclass
class TrainConfig:
    """Every knob of the loop. Scripts map their flags one-to-one onto these fields."""
    # optimisation; the lr schedule is linear warmup then cosine decay (optim.WarmupCosine)
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
    # objective (used by nelbo_objective and recorded in run.json)
    noise_schedule: str = "linear"   # masking (noise) schedule alpha_t: linear | cosine | loglinear
    loss_norm: str = "sequence"      # sequence (dllm) | token (MDLM)
    stratified_t: bool = False       # stratified times over the micro-batch (MDLM) instead of iid
    time_eps: float = 1e-3           # t = eps + (1 - eps) u
    # run
    seed: int = 0
    log_every: int = field(default=10, metadata=MAY_DIFFER)  # steps between metrics lines / bar updates
    eval_every: int = field(default=0, metadata=MAY_DIFFER)  # steps between evaluations (0: at start and end)
    save_every: int = field(default=1000, metadata=MAY_DIFFER)  # steps between checkpoints, one at the end (0: none)
    keep_last: int = field(default=2, metadata=MAY_DIFFER)  # checkpoints kept (older ones deleted)
    max_skipped_steps: int = field(default=5, metadata=MAY_DIFFER)  # non-finite steps in a row before a stop
    bf16: bool = field(default=True, metadata=MAY_DIFFER)  # bf16 autocast on CUDA (CPU always runs fp32)
    device: str | None = field(default=None, metadata=MAY_DIFFER)  # cpu | cuda | cuda:N (None: cuda:LOCAL_RANK or cpu)
    gradient_checkpointing: bool = field(default=False, metadata=MAY_DIFFER)
    resume: bool = field(default=False, metadata=MAY_DIFFER)  # continue from the newest verified checkpoint
    allow_data_change: bool = field(default=False, metadata=MAY_DIFFER)  # --resume may continue on other data
    progress: bool = field(default=True, metadata=MAY_DIFFER)  # progress bar on rank 0 (plumbing.progress)


@dataclass
class TrainResult:
    step: int
    train_loss: float | None                           # mean loss of the last logged interval
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    out_dir: Path | None = None


# ----------------------------------------------------------------------------- objective
def nelbo_objective(mask_id: int, *, schedule: str = "linear", loss_norm: str = "sequence",
                    stratified: bool = False, eps: float = 1e-3) -> Callable:
    """loss_fn(model, batch, generator) -> (loss, weight) for the NELBO (diffusion.nelbo_loss),
    computed by the chunked vocabulary loss (chunked_loss.nelbo_loss: the same value).
    batch: input_ids [B, S], maskable [B, S] bool (CPT: the real tokens; SFT: labels != -100),
    optional attention_mask. weight: what nelbo_loss divided by (maskable tokens, or sequences)."""
    def loss_fn(model, batch, generator):
        maskable, attention_mask = batch["maskable"], batch.get("attention_mask")
        loss, _ = chunked_loss.nelbo_loss(model, batch["input_ids"], mask_id, maskable=maskable,
                                          attention_mask=attention_mask, schedule=schedule, normalize=loss_norm,
                                          stratified=stratified, eps=eps, generator=generator)
        return loss, diffusion.nelbo_normalizer(maskable, loss_norm, attention_mask)

    return loss_fn


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_context(device: str | None = None, *, join: bool = True) -> DistContext:
    """Pick the device and, under torchrun (WORLD_SIZE > 1) and `join`, join the process group
    (nccl on GPU, gloo on CPU). The scripts join only in `train`, once every rank has its data:
    no collective (with its timeout) waits while rank 0 tokenises a corpus. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device, local_rank)
    check_available(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if join and world > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at once (no guess, no extra context)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return DistContext(rank, world, local_rank, device)


def finish_distributed() -> None:
    """Leave the process group (scripts call this at the end of a torchrun run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- output dir
def check_out_dir(out_dir: str | Path, resume: bool) -> Path | None:
    """Refuse to overwrite a finished model or an unfinished run; returns the newest checkpoint
    directory (None for a fresh run)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; expected a directory for the run")
    if (out / "model.safetensors").exists():
        raise UserError(f"--out {out} already holds a finished model (model.safetensors); choose a new --out")
    found = train_state.candidates(out / "checkpoints")
    if resume and not found:
        raise UserError(f"--resume was given but {out / 'checkpoints'} holds no complete checkpoint to continue from")
    if not resume and found:
        raise UserError(f"--out {out} holds checkpoints of an unfinished run; pass --resume to continue it "
                        "or choose a new --out")
    return found[-1][1] if found else None


def total_steps(config: TrainConfig, train_batches, world_size: int = 1) -> int:
    """Optimizer steps of the run: max_steps, or epochs * (batches per epoch // grad_accum)."""
    if config.max_steps is not None:
        if config.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {config.max_steps}")
        return config.max_steps
    per_epoch = train_batches.steps_per_epoch // config.grad_accum
    if per_epoch == 0:
        raise UserError(
            f"too few training examples for one optimizer step: need batch size {config.batch_size} x "
            f"grad accum {config.grad_accum} x {world_size} process(es) per step")
    return max(1, math.ceil((config.epochs or 1.0) * per_epoch))


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """loss.png from metrics.jsonl when matplotlib is importable (extra "plot"); else False."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, label in (("loss", "-", "train"), ("eval_loss", "o-", "eval")):
        points = [r for r in rows if key in r]
        if points or key == "loss":
            ax.plot([r["step"] for r in points], [r[key] for r in points], style, label=label)
    ax.set(xlabel="optimizer step", ylabel="NELBO loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, eval_batches: Iterable[dict], loss_fn, config: TrainConfig, ctx: DistContext) -> float | None:
    """Weighted mean loss over this rank's eval batches, summed over ranks; batch i always uses
    the masking seed (seed, EVAL_SEED_TAG, rank, i), so numbers are comparable across steps."""
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


# ----------------------------------------------------------------------------- the optimiser step
@dataclass
class Learner:
    """What an optimiser step reads and changes."""
    model: torch.nn.Module           # the model being trained (checkpoints and evaluation use it)
    ddp_model: torch.nn.Module       # the same model, wrapped in DistributedDataParallel under torchrun
    params: list                     # its trainable parameters
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler   # warmup + cosine (optim.WarmupCosine)
    generator: torch.Generator       # the masking generator, reseeded before every micro-batch


def warmup_steps(config: TrainConfig, steps: int) -> int:
    """--warmup, or --warmup-ratio of the run's steps."""
    warmup = config.warmup or int(round(config.warmup_ratio * steps))
    if warmup >= steps:
        raise UserError(f"warmup ({warmup} steps) must be shorter than the run ({steps} steps)")
    return warmup


def make_learner(model, config: TrainConfig, ctx: DistContext, steps: int, warmup: int) -> Learner:
    """The model on its device in training mode, AdamW over its trainable parameters and the
    lr schedule (peak config.lr after `warmup` steps, cosine down to config.min_lr at `steps`)."""
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


def _token_count(batch: dict) -> torch.Tensor:
    """Real tokens of a micro-batch, as a device tensor (no host copy)."""
    mask, ids = batch.get("attention_mask"), batch["input_ids"]
    return mask.sum() if mask is not None else ids.new_full((), ids.numel())


@dataclass
class StepResult:
    loss: torch.Tensor         # the step's loss L (device scalar)
    tokens: torch.Tensor       # real tokens trained on (device scalar)
    grad_norm: torch.Tensor    # global gradient norm before clipping (device scalar)
    finite: bool               # L and the gradient norm were finite, so the update was applied


def optimizer_step(learner: Learner, batches, loss_fn, step: int, config: TrainConfig, ctx: DistContext) -> StepResult:
    """Optimiser step `step` (0-based): grad_accum micro-batches on each process, gradients
    normalised over all of them, clipped, one AdamW step and one lr-schedule step. A step whose
    loss or gradient norm is not finite is skipped (no update, gradients dropped): the one host
    read of the step, as torch.amp.GradScaler makes, after all micro-batches are queued."""
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
        totals += torch.stack([loss.detach().float() * weight, weight.float(), _token_count(batch).float()])
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


class LossMeter:
    """The training loss between two metrics lines, kept on the device (the host reads it once per
    logged step), and the skipped (non-finite) steps, in total and in a row."""

    def __init__(self, device: torch.device, skipped: int = 0, skipped_in_a_row: int = 0):
        self.loss = torch.zeros((), device=device)    # sum of step losses since the last read
        self.tokens = torch.zeros((), device=device)  # tokens trained on since the last read
        self.steps = 0
        self.skipped, self.skipped_in_a_row = skipped, skipped_in_a_row
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        """One optimiser step's result: its loss if it was applied, else one more skipped step."""
        if not result.finite:
            self.skipped += 1
            self.skipped_in_a_row += 1
            return
        self.skipped_in_a_row = 0
        self.loss += result.loss
        self.tokens += result.tokens
        self.steps += 1

    def check(self, step: int, config: TrainConfig, ckpt_root: Path) -> None:
        """Stop the run (UserError) after max_skipped_steps non-finite steps in a row."""
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


def check_finite_weights(model, step: int, ckpt_root: Path) -> None:
    """UserError if any trainable parameter holds a nan/inf (one host read): never save or export them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise UserError(f"the weights became non-finite (nan/inf) by step {step}; nothing is saved or exported and "
                        f"the last good checkpoint in {ckpt_root} is kept (try a lower --lr)")


# ----------------------------------------------------------------------------- resume
@dataclass
class Resumed:
    """Where a run continues: the first step to run, the eval losses so far, the checkpoint,
    the non-finite steps skipped so far (in total, and in a row at the checkpoint)."""
    step: int = 0
    eval_losses: list = field(default_factory=list)
    path: Path | None = None
    skipped: int = 0
    skipped_in_a_row: int = 0


def check_same_run(state: dict, path: Path, config: TrainConfig, identity: dict, ctx: DistContext, steps: int) -> None:
    """UserError unless the checkpoint belongs to this run: the same settings but MAY_DIFFER fields,
    identity, processes and length (allow_data_change: DATA fields and the data may differ)."""
    allowed = {MAY_DIFFER[ON_RESUME]} | ({DATA[ON_RESUME]} if config.allow_data_change else set())
    may_differ = {f.name for f in fields(config) if f.metadata.get(ON_RESUME) in allowed}
    saved, now = state.get("config", {}), asdict(config)
    for name in sorted(set(saved) | set(now)):
        if name not in may_differ and saved.get(name) != json.loads(json.dumps(now.get(name), default=str)):
            raise UserError(
                f"--{name.replace('_', '-')} is {now.get(name)!r} but the checkpoint {path} was trained with "
                f"{saved.get(name)!r}; resume with the original settings")
    saved_identity = state.get("identity", {})
    for part, what in (("base_model", "base model (--model)"), ("tokenizer", "tokenizer"), ("data", "data")):
        if saved_identity.get(part) != identity.get(part) and not (part == "data" and config.allow_data_change):
            hint = " (or pass --allow-data-change to continue on new data deliberately)" if part == "data" else ""
            raise UserError(f"the checkpoint {path} was trained with another {what} than this run's; "
                            f"resume with the original one{hint}")
    if state.get("world_size", 1) != ctx.world_size:
        raise UserError(f"the checkpoint {path} was written by {state['world_size']} process(es); "
                        f"resume with the same number, not {ctx.world_size}")
    if state.get("total_steps", steps) != steps:
        raise UserError(f"this run has {steps} steps but the checkpoint {path} belongs to a run of "
                        f"{state['total_steps']}; resume with the original --max-steps/--epochs")


def resume(ckpt_root: Path, learner: Learner, train_batches, config: TrainConfig, ctx: DistContext,
           steps: int, identity: dict) -> Resumed:
    """Load the newest checkpoint that verifies and belongs to this run (check_same_run) into
    `learner` (weights, AdamW, lr schedule, random states) and `train_batches` (data position).
    Each damaged checkpoint is skipped with one line saying why; none left is a UserError."""
    skipped = []
    for _, path in reversed(train_state.candidates(ckpt_root)):
        try:
            reason = train_state.verify_checkpoint(path)
            if reason is not None:
                raise train_state.DamagedCheckpoint(reason)
            check_same_run(train_state.read_state(path), path, config, identity, ctx, steps)
            state = train_state.load_training_state(path, learner.model, learner.optimizer, learner.lr_schedule,
                                                    ctx.rank, learner.generator, fallback_seed=config.seed)
        except train_state.DamagedCheckpoint as damage:
            skipped.append(path.name)
            if ctx.is_main:
                print(f"resume: skipping {path}: {damage}", file=sys.stderr, flush=True)
            continue
        _same_on_every_rank(state["step"], ctx)
        train_batches.load_state_dict(state["data"])
        return Resumed(state["step"], [tuple(e) for e in state.get("eval_losses", [])], path,
                       state.get("skipped_steps", 0), state.get("skipped_in_a_row", 0))
    found = f"its checkpoints ({', '.join(skipped)}) are all damaged" if skipped else "it holds no checkpoint"
    raise UserError(f"--resume was given but {ckpt_root} has nothing to continue from: {found}")


def _same_on_every_rank(step: int, ctx: DistContext) -> None:
    """Every process resumes from the same step (they read the same checkpoint directory)."""
    if not ctx.enabled:
        return
    extremes = torch.tensor([step, -step], device=ctx.device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if int(extremes[0]) != -int(extremes[1]):
        raise UserError(f"the processes found different newest valid checkpoints ({-int(extremes[1])} to "
                        f"{int(extremes[0])}); they must share one --out directory")


# ----------------------------------------------------------------------------- what the run writes
def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop the lines logged after the checkpoint (they are logged again) and any
    line that does not parse (what a crash during an append leaves), with a warning."""
    if not path.exists():
        return
    kept, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            damaged += 1
    if damaged:
        print(f"resume: {path}: {damaged} unreadable line(s) dropped (a crash during an append)",
              file=sys.stderr, flush=True)
    files.write_text(path, "".join(line + "\n" for line in kept))


class RunWriter:
    """Everything a run writes: run.json, metrics.jsonl, the progress bar, the checkpoints and the
    export. Rank 0 writes files; every rank writes its random states into a checkpoint."""

    def __init__(self, out: Path, config: TrainConfig, ctx: DistContext, steps: int, start: Resumed, identity: dict):
        self.out, self.config, self.ctx, self.steps, self.identity = out, config, ctx, steps, identity
        self.ckpt_root, self.metrics_path = out / "checkpoints", out / "metrics.jsonl"
        self.eval_losses = list(start.eval_losses)
        self.start_step, self.resumed_from = start.step, start.path
        self.bar = None

    def start(self, warmup: int, run_info: dict | None) -> None:
        """Create DIR, drop the metrics lines that will be logged again, write run.json, open the bar."""
        ctx, config = self.ctx, self.config
        if ctx.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is not None:
                _trim_metrics(self.metrics_path, self.start_step)
            elif self.metrics_path.exists():
                self.metrics_path.unlink()
            files.write_json(self.out / "run.json", {
                "config": asdict(config), "identity": self.identity, "total_steps": self.steps,
                "warmup_steps": warmup, "world_size": ctx.world_size, "device": str(ctx.device), "argv": sys.argv,
                "versions": {"python": platform.python_version(), "torch": torch.__version__, "minidiff": __version__,
                             "numpy": np.__version__},
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(run_info or {})}, indent=1)
        _barrier(ctx)
        if ctx.is_main and config.progress:
            self.bar = progress.bar(total=self.steps, initial=self.start_step, desc="train", file=sys.stderr)

    def _append(self, record: dict) -> None:
        """One line of metrics.jsonl, flushed to the OS as it is written."""
        if self.ctx.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()

    def advance(self) -> None:
        """One optimiser step done."""
        if self.bar is not None:
            self.bar.update(1)

    def log_train(self, step: int, loss: float | None, lr: float, tokens_per_s: float, epoch, grad_norm,
                  skipped: int) -> None:
        self._append({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "epoch": epoch,
                      "grad_norm": float(grad_norm), "skipped_steps": skipped})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "-", lr=f"{lr:.2e}",
                                 tok_s=f"{tokens_per_s:.0f}")

    def log_eval(self, step: int, value: float | None) -> None:
        if value is None:
            return
        self.eval_losses.append((step, value))
        self._append({"step": step, "eval_loss": value})
        if self.bar is not None:
            self.bar.write(f"step {step}: eval loss {value:.4f}")

    def checkpoint(self, step: int, learner: Learner, data_state: dict, meter: LossMeter) -> None:
        """checkpoints/step-XXXXXX, atomically and verified (training.state), never of non-finite weights."""
        ctx, config = self.ctx, self.config
        check_finite_weights(learner.model, step, self.ckpt_root)
        tmp = self.ckpt_root / f".tmp-{train_state.step_dir_name(step)}"
        if ctx.is_main:
            train_state.begin_checkpoint(self.ckpt_root, step)
        _barrier(ctx)
        train_state.write_rng(tmp, ctx.rank, learner.generator)
        _barrier(ctx)
        if ctx.is_main:
            train_state.finish_checkpoint(
                tmp, step, learner.model, learner.optimizer, learner.lr_schedule,
                {"data": data_state, "config": asdict(config), "identity": self.identity, "world_size": ctx.world_size,
                 "eval_losses": self.eval_losses, "total_steps": self.steps, "skipped_steps": meter.skipped,
                 "skipped_in_a_row": meter.skipped_in_a_row}, config.keep_last)
        _barrier(ctx)

    def finish(self, model, *, tokenizer=None, lora: bool = False, base_model: str | None = None) -> None:
        """Close the bar; export the model (last file: model.safetensors) and plot loss.png."""
        if self.bar is not None:
            self.bar.close()
        check_finite_weights(model, self.steps, self.ckpt_root)
        if self.ctx.is_main:
            export(model, self.out, tokenizer=tokenizer, lora=lora, base_model=base_model)
            plot_losses(self.metrics_path, self.out / "loss.png")
        _barrier(self.ctx)


def export(model, out_dir: str | Path, *, tokenizer=None, lora: bool = False, base_model: str | None = None) -> None:
    """The final model: tokenizer.json, adapter/ (LoRA), config.json and, last, model.safetensors
    (merged weights in the transformers layout), so its presence means the run finished."""
    out = Path(out_dir)
    if tokenizer is not None:
        tokenizer.save(out)
    if lora:
        peft_io.save_adapter(model, out / "adapter", base_model=base_model)
        state = base_state_dict(model)
    else:
        state = model.state_dict()
    save_pretrained(model, out, state_dict=state)  # writes model.safetensors last, atomically


# ----------------------------------------------------------------------------- the loop
def evaluate_and_log(step: int, model, eval_batches, loss_fn, config: TrainConfig, ctx: DistContext,
                     writer: RunWriter) -> None:
    """The evaluation loss at `step` into metrics.jsonl (if there is eval data); non-finite: stop."""
    if eval_batches is None:
        return
    value = evaluate(model, eval_batches, loss_fn, config, ctx)
    if value is not None and not math.isfinite(value):
        raise UserError(f"the evaluation loss is not finite at step {step}; the last good checkpoint is kept")
    writer.log_eval(step, value)


def train(model, train_batches, eval_batches, loss_fn, config: TrainConfig, out_dir, *,
          tokenizer=None, lora: bool = False, base_model: str | None = None,
          run_info: dict | None = None, identity: dict | None = None) -> TrainResult:
    """Train `model` on `train_batches` (a batches.Batches: endless, state_dict/load_state_dict,
    steps_per_epoch) into `out_dir` (docs/training.md, "The run directory"), locked by rank 0.
    eval_batches: this rank's collated batches, or None. lora: checkpoints hold the adapter only;
    the export merges it and also writes DIR/adapter/. run_info: extra JSON for run.json.
    identity: what --resume compares (cli.run_identity); default: the model's weights hash."""
    ctx = distributed_context(config.device)
    out = Path(out_dir)
    identity = identity if identity is not None else {"base_model": train_state.weights_hash(model)}
    with (files.lock_directory(out, "--out") if ctx.is_main else nullcontext()):
        check_out_dir(out, config.resume)
        _barrier(ctx)  # every rank has looked at DIR before rank 0 writes into it
        return _train_locked(model, train_batches, eval_batches, loss_fn, config, out, ctx, identity,
                             dict(tokenizer=tokenizer, lora=lora, base_model=base_model), run_info)


def _train_locked(model, train_batches, eval_batches, loss_fn, config: TrainConfig, out: Path, ctx: DistContext,
                  identity: dict, export_args: dict, run_info: dict | None) -> TrainResult:
    """The loop of `train`, run while DIR is locked."""
    steps = total_steps(config, train_batches, ctx.world_size)
    warmup = warmup_steps(config, steps)
    learner = make_learner(model, config, ctx, steps, warmup)
    if ctx.is_main:  # under the lock no save is in progress: temporaries are from killed ones
        train_state.remove_unfinished(out / "checkpoints")
        files.remove_temporaries(out)
    start = Resumed()
    if config.resume:
        start = resume(out / "checkpoints", learner, train_batches, config, ctx, steps, identity)
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
