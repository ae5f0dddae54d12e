"""The one training loop both train scripts use.

References: MDLM (arXiv 2406.07524) and LLaDA (2502.09992) for the loss (minidiff.diffusion),
Diffutron (2603.20466) for the recipe. Loss normalisation as dllm's trainer (sequence) or MDLM
(token); data parallelism with `torch.nn.parallel.DistributedDataParallel`. docs/training.md.

    config = TrainConfig(lr=1e-4, batch_size=16, grad_accum=2, max_steps=1000, save_every=200)
    loss_fn = nelbo_objective(tok.mask_id, schedule=config.noise_schedule, loss_norm="sequence")
    result = train(model, train_batches, eval_batches, loss_fn, config, "runs/cpt",
                   tokenizer=tok, lora=True, base_model="jhu-clsp/mmBERT-base")

One optimizer step = `grad_accum` micro-batches on each of `world_size` processes. A loss
function returns (loss, weight): the micro-batch loss already divided by `weight` (its token
count for "token" normalisation, its number of sequences for "sequence"). The step's loss is

    L = sum_m loss_m * weight_m / sum_m weight_m        (m over all micro-batches of all ranks)

so each micro-batch backpropagates loss_m * weight_m and the summed gradient is divided by the
global weight (one all-reduce of [loss sum, weight sum, tokens] per step). This is the gradient
one process would get from the whole global batch, for either normalisation.

Randomness: before micro-batch m of step s (m = a * world_size + rank, a the accumulation
index) the masking generator and torch's global RNG (LoRA dropout) are seeded from
(seed, s, m). A run resumed from a checkpoint, or split over ranks, therefore draws exactly
the masks and dropout of one uninterrupted process; the checkpoint also stores every RNG state.
Evaluation uses its own fixed seeds per batch, so eval losses are comparable across steps.

Reading one step: `train` is the loop. `make_learner` builds the model, AdamW and the lr
schedule once; `resume` loads the newest checkpoint when --resume is given; then each
iteration calls `optimizer_step` (micro-batches -> one all-reduce -> gradient scaling -> clip ->
AdamW -> lr schedule), adds its loss to a `LossMeter` (device tensors, read once per logged
step), and hands metrics, eval losses and checkpoints to the `RunWriter`.

Output layout (docs/training.md): DIR/run.json, DIR/metrics.jsonl, DIR/checkpoints/step-XXXXXX/
(minidiff.train_state), and at completion DIR/config.json + tokenizer.json (+ adapter/) and,
written last, DIR/model.safetensors; DIR/loss.png when matplotlib is installed.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from . import files, progress, train_state
from .device import Prefetcher, check_available, enable_tf32, resolve_device, to_device, training_autocast
from .errors import UserError

EVAL_SEED_TAG = 0xE7A1  # separates evaluation seeds from training seeds


@dataclass
class TrainConfig:
    """Every knob of the loop. Scripts map their flags one-to-one onto these fields."""

    # optimisation; the lr schedule is linear warmup then cosine decay (optim.WarmupCosine)
    lr: float = 1e-4                 # peak learning rate
    min_lr: float = 0.0              # learning rate at the end of the cosine decay
    warmup: int = 0                  # warmup steps (linear 0 -> lr); see warmup_ratio
    warmup_ratio: float = 0.0        # warmup as a fraction of the total steps (used when warmup == 0)
    max_steps: int | None = None     # optimizer steps; None: epochs * steps per epoch
    epochs: float | None = None      # passes over the training examples (default 1 without max_steps)
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
    log_every: int = 10              # steps between metrics lines / progress-bar updates
    eval_every: int = 0              # steps between evaluations (0: only at the start and end)
    save_every: int = 0              # steps between checkpoints (0: none)
    keep_last: int = 2               # checkpoints kept (older ones deleted)
    bf16: bool = True                # bf16 autocast on CUDA (CPU always runs fp32)
    device: str | None = None        # cpu | cuda | cuda:N (None: cuda:LOCAL_RANK if available, else cpu)
    gradient_checkpointing: bool = False
    resume: bool = False             # continue from the newest complete checkpoint in DIR
    progress: bool = True            # progress bar, rank 0 (minidiff.progress: tqdm in a terminal, else lines)


# Fields that must equal the checkpoint's for --resume to continue the same run.
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "lr", "min_lr", "warmup", "warmup_ratio",
                     "weight_decay", "beta1", "beta2", "adam_eps", "clip", "noise_schedule", "loss_norm",
                     "stratified_t", "time_eps")


@dataclass
class TrainResult:
    step: int
    train_loss: float | None                           # mean loss of the last logged interval
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    out_dir: Path | None = None


# ----------------------------------------------------------------------------- objective


def nelbo_objective(mask_id: int, *, schedule: str = "linear", loss_norm: str = "sequence",
                    stratified: bool = False, eps: float = 1e-3) -> Callable:
    """loss_fn(model, batch, generator) -> (loss, weight) for diffusion.nelbo_loss.

    batch: input_ids [B, S], maskable [B, S] bool (CPT: the real tokens; SFT: labels != -100),
    optional attention_mask. weight is what nelbo_loss divided by: the maskable-token count
    ("token") or the number of sequences ("sequence").
    """
    from . import diffusion

    def loss_fn(model, batch, generator):
        maskable, attention_mask = batch["maskable"], batch.get("attention_mask")
        loss, _ = diffusion.nelbo_loss(
            model, batch["input_ids"], mask_id, maskable=maskable, attention_mask=attention_mask,
            schedule=schedule, normalize=loss_norm, stratified=stratified, eps=eps,
            generator=generator)
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


def distributed_context(device: str | None = None) -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1; nccl on GPU, gloo on
    CPU) and pick the device (device.resolve_device: None -> cuda:LOCAL_RANK or cpu, a bare
    "cuda" -> cuda:LOCAL_RANK). Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device, local_rank)
    check_available(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
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
    """Refuse to overwrite a finished model or an unfinished run; returns the checkpoint to
    resume from (None for a fresh run)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; expected a directory for the run")
    if (out / "model.safetensors").exists():
        raise UserError(f"--out {out} already holds a finished model (model.safetensors); choose a new --out")
    latest = train_state.latest_checkpoint(out / "checkpoints")
    if resume and latest is None:
        raise UserError(f"--resume was given but {out / 'checkpoints'} holds no complete checkpoint to continue from")
    if not resume and latest is not None:
        raise UserError(f"--out {out} holds checkpoints of an unfinished run; pass --resume to continue it or choose a new --out")
    return latest


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


def versions() -> dict:
    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "minidiff": __version__,
            "numpy": np.__version__}


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """loss.png from metrics.jsonl when matplotlib is importable (extra "plot"); else False."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NELBO loss")
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
    from . import optim

    enable_tf32(ctx.device)
    model.to(ctx.device)
    model.train()
    model.model.gradient_checkpointing = config.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.AdamW(optim.param_groups(model, config.weight_decay), lr=config.lr,
                            betas=(config.beta1, config.beta2), eps=config.adam_eps,
                            weight_decay=config.weight_decay)
    lr_schedule = optim.WarmupCosine(optimizer, warmup=warmup, total=steps, min_lr=config.min_lr)
    return Learner(model, model, params, optimizer, lr_schedule, torch.Generator(device=ctx.device))


def data_parallel(model, ctx: DistContext):
    """DistributedDataParallel(model) when several processes train, else the model itself."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _token_count(batch: dict) -> torch.Tensor:
    """Real tokens of a micro-batch, as a device tensor (no host copy)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum()
    return batch["input_ids"].new_full((), batch["input_ids"].numel())


def optimizer_step(learner: Learner, batches, loss_fn, step: int, config: TrainConfig, ctx: DistContext):
    """Optimiser step `step` (0-based): grad_accum micro-batches on each process, gradients
    normalised over all of them, clipped, one AdamW step and one lr-schedule step.

    Returns (step loss, tokens, gradient norm before clipping or None) as device tensors: nothing
    here waits for the device (the caller reads them once per logged step).
    """
    from . import optim

    totals = torch.zeros(3, device=ctx.device)  # [sum loss * weight, sum weight, tokens]
    for a in range(config.grad_accum):
        batch = next(batches)  # already on the device (asynchronous copy from pinned memory)
        # the same seeds a single process would use for this slice of the global batch
        seed = derived_seed(config.seed, step, a * ctx.world_size + ctx.rank)
        learner.generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout (LoRA) draws from the global RNG
        last_micro = a == config.grad_accum - 1
        sync = nullcontext() if (last_micro or not ctx.enabled) else learner.ddp_model.no_sync()
        with sync:
            with training_autocast(ctx.device, config.bf16):
                loss, weight = loss_fn(learner.ddp_model, batch, learner.generator)
            # backprop loss_m * weight_m; divided by the global weight below
            (loss.float() * weight).backward()
        # totals += [loss_m weight_m, weight_m, tokens_m], all on the device (no sync)
        totals += torch.stack([loss.detach().float() * weight, weight.float(), _token_count(batch).float()])
    if ctx.enabled:
        dist.all_reduce(totals)  # DDP averaged the gradients over ranks: undo that below
    # grad = sum_m d(loss_m weight_m) / sum_m weight_m   (over all ranks)
    grads = [p.grad for p in learner.params if p.grad is not None]
    torch._foreach_mul_(grads, ctx.world_size / totals[1])
    grad_norm = optim.clip_grad_norm(learner.params, config.clip) if config.clip > 0 else None
    learner.optimizer.step()
    learner.lr_schedule.step()
    learner.optimizer.zero_grad(set_to_none=True)
    # L = sum_m loss_m weight_m / sum_m weight_m
    return totals[0] / totals[1], totals[2], grad_norm


class LossMeter:
    """The training loss between two metrics lines, kept on the device: every step adds to
    tensors, and the host reads them once per logged step (`read`, `check_finite`)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)    # sum of step losses since the last read
        self.tokens = torch.zeros((), device=device)  # tokens trained on since the last read
        self.steps = 0
        self.first_bad_step = torch.tensor(-1, device=device)  # first step with a non-finite loss (-1: none)
        self.start = time.perf_counter()

    def add(self, step: int, step_loss: torch.Tensor, tokens: torch.Tensor) -> None:
        """Step number `step` (1-based) had loss `step_loss` over `tokens` tokens."""
        bad_now = ~torch.isfinite(step_loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad_now, self.first_bad_step.new_full((), step), self.first_bad_step)
        self.loss += step_loss
        self.tokens += tokens
        self.steps += 1

    def check_finite(self, ckpt_root: Path) -> None:
        """Stop the run (UserError) if any step so far had a nan/inf loss."""
        bad = int(self.first_bad_step)
        if bad >= 0:
            raise UserError(f"the training loss became non-finite (nan/inf) at step {bad}; the run stopped and "
                            f"the last good checkpoint in {ckpt_root} is kept (try a lower --lr)")

    def read(self) -> tuple[float, float]:
        """(mean step loss, tokens per second of training time) since the last read; starts anew."""
        elapsed = time.perf_counter() - self.start
        mean_loss = float(self.loss) / self.steps
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


# ----------------------------------------------------------------------------- resume


# Fields renamed since older checkpoints were written: old name -> new name.
RENAMED_FIELDS = {"schedule": "noise_schedule"}


def current_field_names(saved_config: dict) -> dict:
    """A config dict from an older state.json/run.json with renamed fields under their new names."""
    return {RENAMED_FIELDS.get(name, name): value for name, value in saved_config.items()}


@dataclass
class Resumed:
    """Where a run continues: the first step to run, the eval losses so far, the checkpoint."""

    step: int = 0
    eval_losses: list = field(default_factory=list)
    path: Path | None = None


def resume(ckpt_root: Path, learner: Learner, train_batches, config: TrainConfig, ctx: DistContext,
           steps: int) -> Resumed:
    """Load the newest complete checkpoint under ckpt_root into `learner` (weights, AdamW, lr
    schedule, this rank's random states) and `train_batches` (data position), after checking it
    belongs to this run (same settings, processes and length)."""
    path = train_state.latest_checkpoint(ckpt_root)
    if path is None:
        raise UserError(f"--resume was given but {ckpt_root} holds no complete checkpoint to continue from")
    state = train_state.load_training_state(path, learner.model, learner.optimizer, learner.lr_schedule,
                                            ctx.rank, learner.generator, fallback_seed=config.seed)
    saved = current_field_names(state.get("config", {}))
    for name in RESUME_MUST_MATCH:
        if name in saved and saved[name] != getattr(config, name):
            raise UserError(
                f"--{name.replace('_', '-')} is {getattr(config, name)!r} but the checkpoint {path} "
                f"was trained with {saved[name]!r}; resume with the original settings")
    if state.get("world_size", 1) != ctx.world_size:
        raise UserError(f"the checkpoint {path} was written by {state['world_size']} process(es); "
                        f"resume with the same number, not {ctx.world_size}")
    if state.get("total_steps", steps) != steps:
        raise UserError(f"this run has {steps} steps but the checkpoint {path} belongs to a run of "
                        f"{state['total_steps']}; resume with the original --max-steps/--epochs")
    train_batches.load_state_dict(state["data"])
    return Resumed(state["step"], [tuple(e) for e in state.get("eval_losses", [])], path)


# ----------------------------------------------------------------------------- what the run writes


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop the lines logged after the checkpoint (they are logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    files.write_text(path, "".join(line + "\n" for line in kept))


class RunWriter:
    """Everything a run writes: DIR/run.json, DIR/metrics.jsonl, the progress bar, the
    checkpoints (keep_last) and the final export. Rank 0 writes files; every rank takes part in
    a checkpoint (its random states). Also keeps the eval losses, which checkpoints store."""

    def __init__(self, out: Path, config: TrainConfig, ctx: DistContext, steps: int, start: Resumed):
        self.out, self.config, self.ctx, self.steps = out, config, ctx, steps
        self.ckpt_root = out / "checkpoints"
        self.metrics_path = out / "metrics.jsonl"
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
                "config": asdict(config), "total_steps": self.steps, "warmup_steps": warmup,
                "world_size": ctx.world_size, "device": str(ctx.device), "argv": sys.argv, "versions": versions(),
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(run_info or {})}, indent=1)
        _barrier(ctx)
        if ctx.is_main and config.progress:
            self.bar = progress.bar(total=self.steps, initial=self.start_step, desc="train", file=sys.stderr)

    def _append(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def advance(self) -> None:
        """One optimiser step done."""
        if self.bar is not None:
            self.bar.update(1)

    def log_train(self, step: int, loss: float, lr: float, tokens_per_s: float, epoch, grad_norm) -> None:
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "epoch": epoch}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self._append(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

    def log_eval(self, step: int, value: float | None) -> None:
        if value is None:
            return
        self.eval_losses.append((step, value))
        self._append({"step": step, "eval_loss": value})
        if self.bar is not None:
            self.bar.write(f"step {step}: eval loss {value:.4f}")

    def checkpoint(self, step: int, learner: Learner, data_state: dict) -> None:
        """checkpoints/step-XXXXXX, atomically (minidiff.train_state); older ones beyond keep_last go."""
        ctx, config = self.ctx, self.config
        tmp = self.ckpt_root / f".tmp-{train_state.step_dir_name(step)}"
        if ctx.is_main:
            train_state.begin_checkpoint(self.ckpt_root, step)
        _barrier(ctx)
        train_state.write_rng(tmp, ctx.rank, learner.generator)
        _barrier(ctx)
        if ctx.is_main:
            train_state.finish_checkpoint(
                tmp, step, learner.model, learner.optimizer, learner.lr_schedule,
                {"data": data_state, "config": asdict(config), "world_size": ctx.world_size,
                 "eval_losses": self.eval_losses, "total_steps": self.steps},
                config.keep_last)
        _barrier(ctx)

    def finish(self, model, *, tokenizer=None, lora: bool = False, base_model: str | None = None) -> None:
        """Close the bar; export the model (last file: model.safetensors) and plot loss.png."""
        if self.bar is not None:
            self.bar.close()
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
        from . import lora as lora_lib

        lora_lib.save_adapter(model, out / "adapter", base_model=base_model)
        state = lora_lib.base_state_dict(model)
    else:
        state = model.state_dict()
    model.save_pretrained(out, state_dict=state)  # writes model.safetensors last, atomically


# ----------------------------------------------------------------------------- the loop


def evaluate_and_log(step: int, model, eval_batches, loss_fn, config: TrainConfig, ctx: DistContext,
                     writer: RunWriter) -> None:
    """The evaluation loss at `step` into metrics.jsonl (nothing without eval data); a
    non-finite one stops the run."""
    if eval_batches is None:
        return
    value = evaluate(model, eval_batches, loss_fn, config, ctx)
    if value is not None and not math.isfinite(value):
        raise UserError(f"the evaluation loss is not finite at step {step}; the last good checkpoint is kept")
    writer.log_eval(step, value)


def train(model, train_batches, eval_batches, loss_fn, config: TrainConfig, out_dir, *,
          tokenizer=None, lora: bool = False, base_model: str | None = None,
          run_info: dict | None = None) -> TrainResult:
    """Train `model` on `train_batches` (a data.Batches: endless, state_dict/load_state_dict,
    steps_per_epoch) and write the run to `out_dir` (layout in the module docstring).

    eval_batches: a list of collated batches (this rank's share) or None. lora: the model has
    LoRA adapters (checkpoints hold the adapter only; the export merges them and also writes
    DIR/adapter/). run_info: extra JSON recorded in run.json (e.g. the script's full config).
    """
    ctx = distributed_context(config.device)
    out = Path(out_dir)
    check_out_dir(out, config.resume)
    _barrier(ctx)  # every rank has looked at DIR before rank 0 writes into it
    steps = total_steps(config, train_batches, ctx.world_size)
    warmup = warmup_steps(config, steps)
    learner = make_learner(model, config, ctx, steps, warmup)
    start = resume(out / "checkpoints", learner, train_batches, config, ctx, steps) if config.resume else Resumed()
    writer = RunWriter(out, config, ctx, steps, start)
    writer.start(warmup, run_info)
    learner.ddp_model = data_parallel(model, ctx)

    step = start.step
    if step == 0:
        evaluate_and_log(step, model, eval_batches, loss_fn, config, ctx, writer)
    batches = Prefetcher(train_batches, ctx.device)  # from here on the data position is the prefetcher's
    meter = LossMeter(ctx.device)
    last_loss = None
    while step < steps:
        step_loss, tokens, grad_norm = optimizer_step(learner, batches, loss_fn, step, config, ctx)
        step += 1
        meter.add(step, step_loss, tokens)
        writer.advance()
        if step % config.log_every == 0 or step == steps:  # the one host read of the interval
            meter.check_finite(writer.ckpt_root)
            last_loss, tokens_per_s = meter.read()
            writer.log_train(step, last_loss, learner.lr_schedule.get_last_lr()[0], tokens_per_s,
                             batches.state_dict().get("epoch"), grad_norm)
        with meter.paused():  # tokens/s counts training time only
            if config.eval_every and step % config.eval_every == 0 and step != steps:
                evaluate_and_log(step, model, eval_batches, loss_fn, config, ctx, writer)
            if config.save_every and step % config.save_every == 0 and step != steps:
                meter.check_finite(writer.ckpt_root)  # never checkpoint a diverged model
                writer.checkpoint(step, learner, batches.state_dict())

    meter.check_finite(writer.ckpt_root)
    evaluate_and_log(step, model, eval_batches, loss_fn, config, ctx, writer)
    writer.finish(model, tokenizer=tokenizer, lora=lora, base_model=base_model)
    return TrainResult(step=step, train_loss=last_loss, eval_losses=writer.eval_losses, out_dir=out)
