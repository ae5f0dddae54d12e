"""The one training loop both train scripts use.

References: MDLM (arXiv 2406.07524) and LLaDA (2502.09992) for the loss (minidiff.diffusion),
Diffutron (2603.20466) for the recipe. Loss normalisation as dllm's trainer (sequence) or MDLM
(token); data parallelism with `torch.nn.parallel.DistributedDataParallel`. docs/training.md.

    config = TrainConfig(lr=1e-4, batch_size=16, grad_accum=2, max_steps=1000, save_every=200)
    loss_fn = nelbo_objective(tok.mask_id, schedule="linear", loss_norm="sequence")
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from . import progress, train_state
from .device import Prefetcher, check_available, enable_tf32, resolve_device, to_device, training_autocast
from .errors import UserError

EVAL_SEED_TAG = 0xE7A1  # separates evaluation seeds from training seeds


@dataclass
class TrainConfig:
    """Every knob of the loop. Scripts map their flags one-to-one onto these fields."""

    # optimisation
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
    schedule: str = "linear"         # diffusion schedule: linear | cosine | loglinear
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
                     "weight_decay", "beta1", "beta2", "adam_eps", "clip", "schedule", "loss_norm",
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


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop the lines logged after the checkpoint (they are logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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


# ----------------------------------------------------------------------------- the loop


def train(model, train_batches, eval_batches, loss_fn, config: TrainConfig, out_dir, *,
          tokenizer=None, lora: bool = False, base_model: str | None = None,
          run_info: dict | None = None) -> TrainResult:
    """Train `model` on `train_batches` (a data.Batches: endless, state_dict/load_state_dict,
    steps_per_epoch) and write the run to `out_dir` (layout in the module docstring).

    eval_batches: a list of collated batches (this rank's share) or None. lora: the model has
    LoRA adapters (checkpoints hold the adapter only; the export merges them and also writes
    DIR/adapter/). run_info: extra JSON recorded in run.json (e.g. the script's full config).
    """
    from . import optim

    ctx = distributed_context(config.device)
    out = Path(out_dir)
    resume_from = check_out_dir(out, config.resume)
    _barrier(ctx)  # every rank has looked at DIR before rank 0 writes into it
    steps = total_steps(config, train_batches, ctx.world_size)
    warmup = config.warmup or int(round(config.warmup_ratio * steps))
    if warmup >= steps:
        raise UserError(f"warmup ({warmup} steps) must be shorter than the run ({steps} steps)")

    enable_tf32(ctx.device)
    model.to(ctx.device)
    model.train()
    model.model.gradient_checkpointing = config.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.AdamW(optim.param_groups(model, config.weight_decay), lr=config.lr,
                            betas=(config.beta1, config.beta2), eps=config.adam_eps,
                            weight_decay=config.weight_decay)
    scheduler = optim.WarmupCosine(optimizer, warmup=warmup, total=steps, min_lr=config.min_lr)
    generator = torch.Generator(device=ctx.device)  # the masking generator
    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"

    step, eval_losses = 0, []
    if resume_from is not None:
        state = train_state.load_training_state(resume_from, model, optimizer, scheduler, ctx.rank, generator,
                                                fallback_seed=config.seed)
        saved = state.get("config", {})
        for name in RESUME_MUST_MATCH:
            if name in saved and saved[name] != getattr(config, name):
                raise UserError(
                    f"--{name.replace('_', '-')} is {getattr(config, name)!r} but the checkpoint {resume_from} "
                    f"was trained with {saved[name]!r}; resume with the original settings")
        if state.get("world_size", 1) != ctx.world_size:
            raise UserError(f"the checkpoint {resume_from} was written by {state['world_size']} process(es); "
                            f"resume with the same number, not {ctx.world_size}")
        if state.get("total_steps", steps) != steps:
            raise UserError(f"this run has {steps} steps but the checkpoint {resume_from} belongs to a run of "
                            f"{state['total_steps']}; resume with the original --max-steps/--epochs")
        step = state["step"]
        train_batches.load_state_dict(state["data"])
        eval_losses = [tuple(e) for e in state.get("eval_losses", [])]

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(exist_ok=True)
        if resume_from is not None:
            _trim_metrics(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()
        _write_json_atomic(out / "run.json", {
            "config": asdict(config), "total_steps": steps, "warmup_steps": warmup,
            "world_size": ctx.world_size, "device": str(ctx.device), "argv": sys.argv,
            "versions": versions(), "resumed_from": str(resume_from) if resume_from else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(run_info or {})})
    _barrier(ctx)

    ddp_model = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def log(record: dict) -> None:
        if ctx.is_main:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def run_eval() -> None:
        if eval_batches is None:
            return
        value = evaluate(model, eval_batches, loss_fn, config, ctx)
        if value is None:
            return
        if not math.isfinite(value):
            raise UserError(f"the evaluation loss is not finite at step {step}; the last good checkpoint is kept")
        eval_losses.append((step, value))
        log({"step": step, "eval_loss": value})
        if bar is not None:
            bar.write(f"step {step}: eval loss {value:.4f}")

    # first optimizer step whose loss was not finite (-1: none); checked at log/save points
    first_bad_step = torch.tensor(-1, device=ctx.device)

    def check_finite() -> None:
        bad = int(first_bad_step)
        if bad >= 0:
            raise UserError(f"the training loss became non-finite (nan/inf) at step {bad}; the run stopped and "
                            f"the last good checkpoint in {ckpt_root} is kept (try a lower --lr)")

    def save_checkpoint() -> None:
        check_finite()
        tmp = ckpt_root / f".tmp-{train_state.step_dir_name(step)}"
        if ctx.is_main:
            train_state.begin_checkpoint(ckpt_root, step)
        _barrier(ctx)
        train_state.write_rng(tmp, ctx.rank, generator)
        _barrier(ctx)
        if ctx.is_main:
            train_state.finish_checkpoint(
                tmp, step, model, optimizer, scheduler,
                {"data": batches.state_dict(), "config": asdict(config), "world_size": ctx.world_size,
                 "eval_losses": eval_losses, "total_steps": steps},
                config.keep_last)
        _barrier(ctx)

    bar = None
    if ctx.is_main and config.progress:
        bar = progress.bar(total=steps, initial=step, desc="train", file=sys.stderr)

    if step == 0:
        run_eval()
    # from here on the data position is the prefetcher's (one batch is held in advance)
    batches = Prefetcher(train_batches, ctx.device)
    # constants of the step, made once on the device: no host->device copy per micro-batch
    zero = torch.zeros((), device=ctx.device)
    interval_loss = zero.clone()  # sum of step losses since the last log
    interval_tokens = zero.clone()
    interval_steps, interval_start = 0, time.perf_counter()
    last_loss = None
    while step < steps:
        totals = torch.zeros(3, device=ctx.device)  # [sum loss * weight, sum weight, tokens]
        for a in range(config.grad_accum):
            batch = next(batches)  # already on the device (asynchronous copy from pinned memory)
            # the same seeds a single process would use for this slice of the global batch
            seed = derived_seed(config.seed, step, a * ctx.world_size + ctx.rank)
            generator.manual_seed(seed)
            torch.manual_seed(seed)  # dropout (LoRA) draws from the global RNG
            last_micro = a == config.grad_accum - 1
            sync = nullcontext() if (last_micro or not ctx.enabled) else ddp_model.no_sync()
            with sync:
                with training_autocast(ctx.device, config.bf16):
                    loss, weight = loss_fn(ddp_model, batch, generator)
                # backprop loss_m * weight_m; divided by the global weight below
                (loss.float() * weight).backward()
            mask = batch.get("attention_mask")
            tokens = mask.sum() if mask is not None else zero + batch["input_ids"].numel()
            # totals += [loss_m weight_m, weight_m, tokens_m], all on the device (no sync)
            totals += torch.stack([loss.detach().float() * weight, weight.float(), tokens.float()])
        if ctx.enabled:
            dist.all_reduce(totals)  # DDP averaged the gradients over ranks: undo that below
        # grad = sum_m d(loss_m weight_m) / sum_m weight_m   (over all ranks)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, ctx.world_size / totals[1])
        grad_norm = optim.clip_grad_norm(params, config.clip) if config.clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = totals[0] / totals[1]
        bad_now = ~torch.isfinite(step_loss) & (first_bad_step < 0)
        first_bad_step = torch.where(bad_now, first_bad_step.new_full((), step + 1), first_bad_step)
        step += 1
        interval_loss += step_loss
        interval_tokens += totals[2]
        interval_steps += 1
        if bar is not None:
            bar.update(1)

        if step % config.log_every == 0 or step == steps:
            check_finite()
            elapsed = time.perf_counter() - interval_start
            last_loss = float(interval_loss) / interval_steps
            record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": float(interval_tokens) / max(elapsed, 1e-9),
                      "epoch": batches.state_dict().get("epoch")}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
            interval_loss.zero_()
            interval_tokens.zero_()
            interval_steps, interval_start = 0, time.perf_counter()
        paused = time.perf_counter()
        if config.eval_every and step % config.eval_every == 0 and step != steps:
            run_eval()
        if config.save_every and step % config.save_every == 0 and step != steps:
            save_checkpoint()
        interval_start += time.perf_counter() - paused  # tokens/s counts training time only

    check_finite()
    run_eval()
    if bar is not None:
        bar.close()
    if ctx.is_main:
        export(model, out, tokenizer=tokenizer, lora=lora, base_model=base_model)
        plot_losses(metrics_path, out / "loss.png")
    _barrier(ctx)
    return TrainResult(step=step, train_loss=last_loss, eval_losses=eval_losses, out_dir=out)


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
