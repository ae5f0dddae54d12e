"""What train_cpt.py and train_sft.py share: flags generated from their config dataclass (one flag
per field: minidiff.plumbing.flags), model building (load, from scratch, LoRA), evaluation batches.
References: Diffutron (arXiv 2603.20466) for the presets' values; otherwise plumbing (docs/training.md).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from minidiff import lora
from minidiff.data import examples, shards
from minidiff.data.batches import Batches
from minidiff.errors import UserError
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing import flags
from minidiff.plumbing.checkpoint import load_model
from minidiff.plumbing.distributed import distributed_context, finish_distributed
from minidiff.training import trainer
from minidiff.training.resume import AUTO, DATA, MAY_DIFFER, check_out_dir
from minidiff.training.state import weights_hash
from minidiff.training.trainer import TrainConfig

TRAIN_HELP = {  # help texts of the TrainConfig fields, shared by both scripts
    "lr": "peak learning rate of the lr schedule (linear warmup, then cosine decay)",
    "min_lr": "final learning rate of the lr schedule's cosine decay",
    "warmup": "linear warmup steps of the lr schedule", "warmup_ratio": "warmup as a fraction of the total steps",
    "max_steps": "optimizer steps (instead of --epochs)", "epochs": "passes over the data (default 1)",
    "batch_size": "sequences per micro-batch per process", "grad_accum": "micro-batches per optimizer step",
    "weight_decay": "AdamW weight decay", "beta1": "AdamW beta1", "beta2": "AdamW beta2", "adam_eps": "AdamW eps",
    "clip": "max gradient norm (0: no clipping)", "time_eps": "t = eps + (1 - eps) u",
    "noise_schedule": "noise (masking) schedule of the diffusion loss: linear | cosine | loglinear",
    "loss_norm": "sequence: per-sequence mean then batch mean (dllm); token: sum / real tokens (MDLM)",
    "stratified_t": "stratified diffusion times over the micro-batch (MDLM) instead of iid",
    "seed": "seed of the data order, masks and init", "log_every": "steps between metrics lines",
    "eval_every": "steps between evaluations (0: start and end)", "keep_last": "checkpoints kept",
    "save_every": "steps between checkpoints, plus one at the end (0: none)", "progress": "show a progress bar",
    "max_skipped_steps": "optimizer steps in a row with a non-finite loss or gradient (each skipped) before "
                         "the run stops",
    "allow_data_change": "with --resume: continue on other data (or other data settings) than the checkpoint's",
    "bf16": "bf16 autocast on CUDA", "gradient_checkpointing": "recompute activations in backward (less memory)",
    "resume": "continue from the newest checkpoint in --out that verifies; --resume auto: that, or start afresh "
              "when --out holds no checkpoint (for torchrun --max-restarts)",
    "device": "cpu, cuda, cuda:1 ... (default: cuda when available; a bare cuda under torchrun: cuda:LOCAL_RANK)",
}


@dataclass
class ScriptConfig(TrainConfig):
    """The fields both train scripts have on top of the loop's; each script's config adds its own."""
    model: str | None = field(default=None, metadata=MAY_DIFFER)
    tokenizer: str | None = field(default=None, metadata=MAY_DIFFER)
    data: list[str] | None = field(default=None, metadata=MAY_DIFFER)
    out: str | None = field(default=None, metadata=MAY_DIFFER)
    preset: str | None = field(default=None, metadata=MAY_DIFFER)
    max_len: int = field(default=512, metadata=DATA)
    eval_data: list[str] | None = field(default=None, metadata=MAY_DIFFER)
    eval_fraction: float = field(default=0.0, metadata=DATA)
    lora_r: int = 256
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["Wqkv", "Wo", "Wi"])


SCRIPT_HELP = {  # help texts of the ScriptConfig fields the scripts do not word differently
    "out": "output directory of the run", "preset": "settings of a paper run (listed below)",
    "eval_fraction": "hold out this fraction of the training examples for evaluation",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale alpha / r)", "lora_dropout": "LoRA dropout",
    "lora_targets": "linear layers adapted (the name Wo matches attention and MLP output)",
}


def config_parser(cls, prog: str, description: str, helps: dict[str, str], presets: dict[str, dict]):
    """One flag per config field: the script's own first, then the loop's; --preset NAME among `presets`."""
    parser = flags.Parser(prog=prog, description=description, epilog=flags.format_presets(presets),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    loop_names = [f.name for f in fields(TrainConfig)]
    script_names = [f.name for f in fields(cls) if f.name not in loop_names]
    flags.add_fields(parser.add_argument_group("model, data and output"), cls, helps=helps, names=script_names,
                     choices={"preset": sorted(presets)})
    loop = parser.add_argument_group("training loop (minidiff.training.trainer.TrainConfig)")
    flags.add_fields(loop, cls, helps=helps, names=[n for n in loop_names if n != "resume"])
    # --resume (True), --resume auto ("auto") and --no-resume (False) for TrainConfig.resume
    loop.add_argument("--resume", dest="resume", nargs="?", const=True, choices=[AUTO], metavar=AUTO,
                      default=argparse.SUPPRESS, help=f"{helps.get('resume', '')} (default: False)".strip())
    loop.add_argument("--no-resume", dest="resume", action="store_false", default=argparse.SUPPRESS,
                      help="a fresh run only (the default)")
    return parser


def parse_config(cls, parser, argv, presets: dict[str, dict]):
    """(config, names of the fields given on the command line); explicit flags override a preset."""
    given = flags.parse_given(parser, argv, cls)
    return cls(**flags.with_preset(given, presets, given.get("preset"))), set(given)


def start(cls, prog: str, description: str, helps: dict[str, str], presets: dict[str, dict], check, argv):
    """Parse and check(config, given) the flags, pick the device, refuse an --out a run would overwrite."""
    parser = config_parser(cls, prog, description, helps, presets)
    config, given = parse_config(cls, parser, argv, presets)
    check(config, given)
    ctx = distributed_context(config.device, join=False)
    check_out_dir(config.out, config.resume)
    return config, ctx


def split_held_out(train: examples.Examples, config, read_eval) -> tuple[examples.Examples, list]:
    if config.eval_data:
        return train, read_eval(config.eval_data)
    if config.eval_fraction > 0:
        return examples.split(train, config.eval_fraction, seed=config.seed)
    return train, []


def check_common(config, given: set[str]) -> None:
    if "max_steps" in given and "epochs" in given:
        raise UserError("--max-steps and --epochs both given; choose one way to set the run length")
    if config.max_steps is not None and config.epochs is not None:
        config.epochs = None  # a preset's epochs give way to an explicit --max-steps
    if "warmup" in given and "warmup_ratio" in given:
        raise UserError("--warmup and --warmup-ratio both given; choose one")
    for name in ("batch_size", "grad_accum", "max_steps", "epochs", "lr", "max_len", "log_every", "keep_last",
                 "max_skipped_steps"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    ranges = {"lr": (0.0, False), "min_lr": (0.0, True), "adam_eps": (0.0, False), "weight_decay": (0.0, True),
              "clip": (0.0, True), "time_eps": (0.0, False)}  # name: (lower bound, bound allowed)
    for name, (low, inclusive) in ranges.items():
        value = getattr(config, name)
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                            f"got {value!r}")
    if config.min_lr > config.lr:
        raise UserError(f"--min-lr {config.min_lr!r} is above --lr {config.lr!r}; the cosine decays from lr to min-lr")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise UserError(f"--{name} must lie in [0, 1), got {getattr(config, name)!r}")
    if not config.time_eps < 1.0:
        raise UserError(f"--time-eps must lie in (0, 1), got {config.time_eps!r}")
    for name in ("eval_every", "save_every", "warmup"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise UserError(f"--warmup-ratio must lie in [0, 1), got {config.warmup_ratio}")
    if config.noise_schedule not in ("linear", "cosine", "loglinear"):
        raise UserError(f"--noise-schedule {config.noise_schedule!r} is unknown; expected linear, cosine or loglinear")
    if config.loss_norm not in ("sequence", "token"):
        raise UserError(f"--loss-norm {config.loss_norm!r} is unknown; expected sequence or token")
    if getattr(config, "eval_data", None) and "eval_fraction" in given:
        raise UserError("--eval-data and --eval-fraction both given; choose one source of evaluation data")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must lie in [0, 1), got {config.eval_fraction}")


def check_lora_flags(lora_on: bool, given: set[str], switch: str) -> None:
    for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
        if not lora_on and name in given:
            raise UserError(f"--{name.replace('_', '-')} was given but LoRA is off ({switch}); drop one of them")


def build_model(model_name: str | None, from_scratch: str | None, tokenizer, seed: int, max_len: int):
    """Load `model_name` (directory or hub id), or build a fresh model from a config.json; check that it fits."""
    if from_scratch:
        path = Path(from_scratch)
        if not path.is_file():
            raise UserError(f"--from-scratch {path} does not exist; expected a model config.json")
        try:
            config = ModelConfig.from_json(path)
        except (ValueError, TypeError) as err:
            raise UserError(f"--from-scratch {path} is not a valid model config ({err})") from None
        seed_everything(seed)
        model = ModernBertMLM(config)
    else:
        model = load_model(model_name)
    if max_len > model.config.max_position_embeddings:
        raise UserError(f"--max-len {max_len} exceeds the model's context of {model.config.max_position_embeddings} "
                        "positions (max_position_embeddings in its config.json); lower --max-len")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}; use a matching --tokenizer")
    return model


def seed_everything(seed: int) -> None:
    """python, numpy and torch (CPU and CUDA) seeded: a fresh model or LoRA init is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def apply_lora_from(config, model):
    """LoRA on `model` as the config says (A initialised from torch's RNG seeded with config.seed)."""
    seed_everything(config.seed)
    lora.apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    targets=tuple(config.lora_targets))
    return lora.lora_report(model)


def run_identity(model, tok, train, held_out) -> dict:
    """What --resume compares (docs/training.md, "The same run, or none"): base weights, tokenizer, shards."""
    return {"base_model": weights_hash(model), "tokenizer": shards.tokenizer_hash(tok),
            "data": {"train": shard_keys(train), "eval": shard_keys(held_out)}}


def shard_keys(view) -> list[str]:
    """The content keys of the token shards under a view (mixes and splits are the config's, compared apart)."""
    if isinstance(view, examples.Take):
        return shard_keys(view.base)
    if isinstance(view, examples.Concat):
        return [key for part in view.parts for key in shard_keys(part)]
    shard = getattr(view, "shard", None)
    return [shard.content_key] if shard is not None else []


def eval_batches(held_out, batch_size: int, rank: int, world_size: int, collate) -> list[dict]:
    mine = list(held_out)[rank::world_size]
    return [collate(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]


def say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def run_training(config, ctx, model, tok, train, held_out, collate, *, lora: bool, script: str,
                 data_report: dict | None = None) -> int:
    """Batches, the NELBO objective, the loop, a summary line; data_report (run.json): what the data rules kept."""
    batches = Batches(train, config.batch_size, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
                      drop_last=True, collate=collate)
    evals = eval_batches(held_out, config.batch_size, ctx.rank, ctx.world_size, collate) if held_out else None
    loss_fn = trainer.nelbo_objective(tok.mask_id, schedule=config.noise_schedule, loss_norm=config.loss_norm,
                                      stratified=config.stratified_t, eps=config.time_eps)
    run_info = {"script": script, "num_train": len(train), "num_eval": len(held_out),
                **({"data": data_report} if data_report else {})}
    identity = run_identity(model, tok, train, held_out)
    result = trainer.train(model, batches, evals, loss_fn, config, config.out, tokenizer=tok, lora=lora,
                           base_model=config.model, run_info=run_info, identity=identity)
    if ctx.is_main:
        last_eval = f", eval loss {result.eval_losses[-1][1]:.4f}" if result.eval_losses else ""
        train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "- (no step left to run)"
        print(f"done: {result.step} steps, train loss {train_loss}{last_eval}; model in {config.out}")
    finish_distributed()
    return 0
