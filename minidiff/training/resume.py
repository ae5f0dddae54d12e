"""Resume policy: which output directory a run may write into, and which checkpoint it continues
(docs/training.md, "The run directory", "Resume")."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from minidiff.errors import UserError
from minidiff.plumbing.distributed import DistContext
from minidiff.training import state as train_state

# What --resume may change is declared on each config field, field(metadata=...); a field without it must equal
# the checkpoint's. Paths may change: what they hold is compared by content (the run's identity).
ON_RESUME = "on_resume"
MAY_DIFFER = {ON_RESUME: "may differ"}  # logging, intervals, device, paths, run length
DATA = {ON_RESUME: "data"}  # how the data is read, shaped and mixed: may differ under --allow-data-change
AUTO = "auto"  # --resume auto


def check_out_dir(out_dir: str | Path, resume: bool | str) -> Path | None:
    """Refuse to overwrite a finished model or an unfinished run; the newest checkpoint directory, or None."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; expected a directory for the run")
    if (out / "model.safetensors").exists():
        raise UserError(f"--out {out} already holds a finished model (model.safetensors); choose a new --out")
    found = train_state.candidates(out / "checkpoints")
    if resume is True and not found:
        raise UserError(f"--resume was given but {out / 'checkpoints'} holds no complete checkpoint to continue from")
    if not resume and found:
        raise UserError(f"--out {out} holds checkpoints of an unfinished run; pass --resume (or --resume auto) to "
                        "continue it or choose a new --out")
    return found[-1][1] if found else None


@dataclass
class Resumed:
    """Where a run continues: first step, eval losses so far, checkpoint, non-finite steps skipped so far."""
    step: int = 0
    eval_losses: list = field(default_factory=list)
    path: Path | None = None
    skipped: int = 0
    skipped_in_a_row: int = 0


def resume(ckpt_root: Path, learner, train_batches, config, ctx: DistContext, steps: int, identity: dict) -> Resumed:
    """Load the newest checkpoint that verifies and belongs to this run into `learner` and `train_batches`;
    each damaged checkpoint is skipped with one line saying why; none left is a UserError."""
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


def check_same_run(state: dict, path: Path, config, identity: dict, ctx: DistContext, steps: int) -> None:
    """UserError unless the checkpoint belongs to this run: settings, identity, processes and length."""
    allowed = {MAY_DIFFER[ON_RESUME]} | ({DATA[ON_RESUME]} if config.allow_data_change else set())
    may_differ = {f.name for f in fields(config) if f.metadata.get(ON_RESUME) in allowed}
    saved, now = state.get("config", {}), asdict(config)
    for name in sorted(set(saved) | set(now)):
        if name not in may_differ and saved.get(name) != json.loads(json.dumps(now.get(name), default=str)):
            raise UserError(f"--{name.replace('_', '-')} is {now.get(name)!r} but the checkpoint {path} was trained "
                            f"with {saved.get(name)!r}; resume with the original settings")
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


def _same_on_every_rank(step: int, ctx: DistContext) -> None:
    """Every process resumes from the same step (they read the same checkpoint directory)."""
    if not ctx.enabled:
        return
    extremes = torch.tensor([step, -step], device=ctx.device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if int(extremes[0]) != -int(extremes[1]):
        raise UserError(f"the processes found different newest valid checkpoints ({-int(extremes[1])} to "
                        f"{int(extremes[0])}); they must share one --out directory")
