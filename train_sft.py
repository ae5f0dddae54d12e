"""Instruction tuning (one stage per run) with the masked-diffusion NELBO on the answers (dllm's recipe).

References: Diffutron (arXiv 2603.20466, SFT stages), LLaDA (2502.09992, SFT), MDLM
(2406.07524). Matches dllm's BERT `sft.py`. Reader's page: docs/training.md.

    python train_sft.py --model runs/cpt --data llamaturk.jsonl --format alpaca --out runs/sft1
    python train_sft.py --preset diffutron-sft1 --model runs/cpt --data ... --out runs/sft1
    python train_sft.py --preset diffutron-sft2 --model runs/sft1 --data instructurca.parquet --out runs/sft2

Each row is rendered with the plain-text chat template ([Question] ... [/Question], [Answer] ...
[/Answer]); the prompt (up to and including the generation prompt "[Answer]\\n") gets label -100:
never masked, no loss. The answer and the padding after it (pad token, up to the batch length)
are the labels: the model learns to end its answer with padding. No attention mask. Rows whose
prompt alone fills --max-len are dropped (or cut from the left with --long-prompts cut; counted), the
rest right-truncated. Full fine-tuning
by default (`--lora` for LoRA). Stage 2 is another run with --model pointing at stage 1's --out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from minidiff.data import examples, shards
from minidiff.data.batches import collate_sft
from minidiff.data.chat import SFT_FORMATS
from minidiff.errors import UserError, run_cli
from minidiff.training import cli as train_cli
from minidiff.training.resume import DATA, MAY_DIFFER


@dataclass
class SFTConfig(train_cli.ScriptConfig):
    format: str = field(default="alpaca", metadata=DATA)
    max_len: int = field(default=256, metadata=DATA)
    long_prompts: str = field(default="drop", metadata=DATA)
    pad_fill: str = field(default="pad", metadata=DATA)
    lora: bool = False
    shard_cache: str | None = field(default=None, metadata=MAY_DIFFER)


HELP = {
    **train_cli.TRAIN_HELP,
    **train_cli.SCRIPT_HELP,
    "model": "model to tune: a directory (e.g. the --out of train_cpt.py or of stage 1) or a hub id",
    "tokenizer": "tokenizer directory (default: --model)",
    "data": "SFT rows: .jsonl/.json/.csv/.parquet files, directories, hf://datasets/ORG/NAME, or shard "
            "directories from `python -m minidiff.data.shards prepare --kind sft`",
    "shard_cache": "where raw sources are tokenised to on first use (default: $MINIDIFF_SHARD_CACHE, "
                   "else $MINIDIFF_CACHE/shards, else ~/.cache/minidiff/shards)",
    "format": "row format: alpaca (instruction/input/output), instructurca (Input/Output), messages (role/content list)",
    "max_len": "sequence length in tokens (prompt + answer + padding)",
    "long_prompts": "a row whose prompt alone fills --max-len: drop it, or cut the prompt from the left to "
                    "max_len // 2 tokens (both counted)",
    "pad_fill": "token the answers are padded (and trained) with: pad (dllm) or eos",
    "eval_data": "held-out rows for the evaluation loss (same --format)",
    "eval_fraction": "hold out this fraction of the rows for evaluation",
    "lora": "LoRA instead of full fine-tuning",
}

PRESETS = {
    "diffutron-sft1": dict(
        format="alpaca", epochs=20.0, batch_size=16, grad_accum=1, lr=1e-4, max_len=256, lora=False,
        noise_schedule="linear", loss_norm="sequence", bf16=True, save_every=1000, keep_last=2,
        _note="Diffutron stage 1: metunlp/LlamaTurk-Instruction-Set, full fine-tune, 20 epochs, batch 16, lr 1e-4"),
    "diffutron-sft2": dict(
        format="instructurca", epochs=8.0, batch_size=96, grad_accum=1, lr=1e-4, max_len=256, lora=False,
        noise_schedule="linear", loss_norm="sequence", bf16=True, save_every=1000, keep_last=2,
        _note="Diffutron stage 2: turkish-nlp-suite/InstrucTurca from stage 1, 8 epochs, batch 96 (the paper ran "
              "two A100s: with torchrun --nproc_per_node=2 use --batch-size 48 for the same global batch), lr 1e-4"),
}


def check(config: SFTConfig, given: set[str]) -> None:
    if not config.model:
        raise UserError("--model is required: the model directory (or hub id) to instruction-tune")
    if not config.data:
        raise UserError("--data is required: one or more SFT row files, directories or hf:// ids")
    if not config.out:
        raise UserError("--out is required: the directory the run is written to")
    if config.format not in SFT_FORMATS:
        raise UserError(f"--format {config.format!r} is unknown; expected one of {', '.join(SFT_FORMATS)}")
    if config.long_prompts not in examples.LONG_PROMPTS:
        raise UserError(f"--long-prompts {config.long_prompts!r} is unknown; expected drop or cut")
    if config.pad_fill not in ("pad", "eos"):
        raise UserError(f"--pad-fill {config.pad_fill!r} is unknown; expected pad or eos")
    train_cli.check_lora_flags(config.lora, given, "no --lora")
    train_cli.check_common(config, given)


def sft_examples_from(sources, config: SFTConfig, tok, ctx) -> examples.Examples:
    """(input_ids, labels) of every source's rows, one source after another, over token shards
    (prepared into the cache on first use, or directories written by `python -m minidiff.data.shards
    prepare --kind sft`)."""
    views = []
    for source in sources:
        shard = shards.open_source(source, "sft", shards.sft_options(config.format), tok,
                                   cache_dir=config.shard_cache, progress=config.progress,
                                   say=lambda text: train_cli.say(ctx.rank, text))
        train_cli.say(ctx.rank, f"{source}: {shard.manifest['read_summary']}")
        views.append(examples.SFTExamples(shard, config.max_len, config.long_prompts))
    train_cli.say(ctx.rank, examples.sft_report(views).summary())
    return examples.Concat(views)


def report_of(train: examples.Concat) -> dict:
    """What the SFT rows kept, cut, dropped and truncated (recorded in run.json as "data")."""
    return dataclasses.asdict(examples.sft_report(train.parts))


def main(argv=None) -> int:
    from minidiff.data.tokenizer import load_tokenizer

    config, ctx = train_cli.start(SFTConfig, "train_sft.py", __doc__, HELP, PRESETS, check, argv)

    tok = load_tokenizer(config.tokenizer or config.model)
    train = sft_examples_from(config.data, config, tok, ctx)
    report = report_of(train)
    train, held_out = train_cli.split_held_out(
        train, config, lambda sources: sft_examples_from(sources, config, tok, ctx))
    train_cli.say(ctx.rank, f"{len(train):,} training examples, {len(held_out):,} evaluation examples")

    model = train_cli.build_model(config.model, None, tok, config.seed, config.max_len)
    if config.lora:
        train_cli.say(ctx.rank, "LoRA: " + train_cli.apply_lora_from(config, model))

    def collate(batch):
        return collate_sft(batch, tok.pad_id, tok.eos_id, fill=config.pad_fill)

    return train_cli.run_training(config, ctx, model, tok, train, held_out, collate,
                                  lora=config.lora, script="train_sft.py", data_report=report)


if __name__ == "__main__":
    run_cli(main)
