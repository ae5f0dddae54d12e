"""What a training run writes into its directory: run.json, metrics.jsonl, the progress bar, the
checkpoints, the exported model and loss.png (the layout: docs/training.md, "The run directory")."""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from minidiff import __version__
from minidiff.errors import UserError
from minidiff.plumbing import files, progress
from minidiff.plumbing.checkpoint import export
from minidiff.plumbing.distributed import DistContext, barrier
from minidiff.training import state as train_state


class RunWriter:
    """Everything a run writes: rank 0 its files, every rank its random states; `start`: a resume.Resumed."""

    def __init__(self, out: Path, config, ctx: DistContext, steps: int, start, identity: dict):
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
                trim_metrics(self.metrics_path, self.start_step)
            elif self.metrics_path.exists():
                self.metrics_path.unlink()
            files.write_json(self.out / "run.json", {
                "config": asdict(config), "identity": self.identity, "total_steps": self.steps,
                "warmup_steps": warmup, "world_size": ctx.world_size, "device": str(ctx.device), "argv": sys.argv,
                "versions": {"python": platform.python_version(), "torch": torch.__version__, "minidiff": __version__,
                             "numpy": np.__version__},
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(run_info or {})}, indent=1)
        barrier(ctx)
        if ctx.is_main and config.progress:
            self.bar = progress.bar(total=self.steps, initial=self.start_step, desc="train", file=sys.stderr)

    def advance(self) -> None:  # one optimiser step done
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

    def _append(self, record: dict) -> None:
        if self.ctx.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()

    def checkpoint(self, step: int, learner, data_state: dict, meter) -> None:
        """checkpoints/step-XXXXXX, atomically and verified (training.state), never of non-finite weights."""
        ctx, config = self.ctx, self.config
        check_finite_weights(learner.model, step, self.ckpt_root)
        tmp = files.temporary_path(self.ckpt_root / train_state.step_dir_name(step), shared=True)
        if ctx.is_main:
            train_state.begin_checkpoint(self.ckpt_root, step)
        barrier(ctx)
        train_state.write_rng(tmp, ctx.rank, learner.generator)
        barrier(ctx)
        if ctx.is_main:
            train_state.finish_checkpoint(
                tmp, step, learner.model, learner.optimizer, learner.lr_schedule,
                {"data": data_state, "config": asdict(config), "identity": self.identity, "world_size": ctx.world_size,
                 "eval_losses": self.eval_losses, "total_steps": self.steps, "skipped_steps": meter.skipped,
                 "skipped_in_a_row": meter.skipped_in_a_row}, config.keep_last)
        barrier(ctx)

    def finish(self, model, *, tokenizer=None, lora: bool = False, base_model: str | None = None) -> None:
        """Close the bar; export the model (last file: model.safetensors) and plot loss.png."""
        if self.bar is not None:
            self.bar.close()
        check_finite_weights(model, self.steps, self.ckpt_root)
        if self.ctx.is_main:
            export(model, self.out, tokenizer=tokenizer, lora=lora, base_model=base_model)
            plot_losses(self.metrics_path, self.out / "loss.png")
        barrier(self.ctx)


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop the lines logged after the checkpoint and, with a warning, any that does not parse."""
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


def check_finite_weights(model, step: int, ckpt_root: Path) -> None:
    """UserError if any trainable parameter holds a nan/inf (one host read)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise UserError(f"the weights became non-finite (nan/inf) by step {step}; nothing is saved or exported and "
                        f"the last good checkpoint in {ckpt_root} is kept (try a lower --lr)")


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
