"""Continual pre-training of a ModernBERT encoder with the masked-diffusion NELBO (MDLM 2406.07524).

References: Diffutron (arXiv 2603.20466, CPT), MDLM (2406.07524, the NELBO), LoRA (2106.09685),
mmBERT (2509.06888). Matches dllm's BERT pre-training recipe. Reader's page: docs/training.md.

    python train_cpt.py --model jhu-clsp/mmBERT-base --data wiki.txt web.jsonl --out runs/cpt
    python train_cpt.py --preset diffutron-cpt --model jhu-clsp/mmBERT-base --data ... --out runs/cpt
    torchrun --nproc_per_node=8 train_cpt.py ...                  # data parallel, same global batch
    python train_cpt.py ... --resume                              # continue from the newest checkpoint
    torchrun --max-restarts=3 train_cpt.py ... --resume auto      # that, or a fresh start if there is none

LoRA (r=256, alpha=256, dropout 0.05 on Wqkv, Wo, Wi) by default, `--full` for full fine-tuning.
Each document is framed `<bos> doc <eos>` and dropped when longer than --max-len (the paper), or
with --pack concatenated and cut into full --max-len blocks (dllm). The loss is one Monte-Carlo
draw of the NELBO per sequence with every real token maskable. The run is written to --out
(checkpoints/, metrics.jsonl, run.json, and at the end config.json + model.safetensors +
tokenizer.json, plus adapter/ for LoRA runs). Sources are tokenised once into memory-mapped token
shards (minidiff.data.shards; cached, or prepared ahead with `python -m minidiff.data.shards prepare`), so
memory does not grow with the corpus.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minidiff.data import examples, shards
from minidiff.data.batches import collate_cpt
from minidiff.errors import UserError, run_cli
from minidiff.training import cli as train_cli
from minidiff.training.resume import DATA, MAY_DIFFER


@dataclass
class CPTConfig(train_cli.ScriptConfig):
    from_scratch: str | None = field(default=None, metadata=MAY_DIFFER)
    text_field: str = field(default="text", metadata=DATA)
    per_file: bool = field(default=False, metadata=DATA)
    pack: bool = field(default=False, metadata=DATA)
    mix_counts: list[int] | None = field(default=None, metadata=DATA)
    mix_ratios: list[float] | None = field(default=None, metadata=DATA)
    full: bool = False
    shard_cache: str | None = field(default=None, metadata=MAY_DIFFER)


HELP = {
    **train_cli.TRAIN_HELP,
    **train_cli.SCRIPT_HELP,
    "model": "base model: a local directory or a hub id (config.json + model.safetensors + tokenizer.json)",
    "from_scratch": "train a freshly initialised model with this config.json instead of loading --model",
    "tokenizer": "tokenizer directory (default: --model, or the directory of --from-scratch)",
    "data": "training sources: .txt (one document per line), .jsonl/.json/.csv/.parquet, directories, "
            "hf://datasets/ORG/NAME, or shard directories from `python -m minidiff.data.shards prepare`",
    "shard_cache": "where raw sources are tokenised to on first use (default: $MINIDIFF_SHARD_CACHE, "
                   "else $MINIDIFF_CACHE/shards, else ~/.cache/minidiff/shards)",
    "text_field": "column holding the text in .jsonl/.json/.csv/.parquet sources",
    "per_file": "a whole .txt file is one document (instead of one per line)",
    "max_len": "sequence length in tokens, <bos> and <eos> included",
    "pack": "pack documents into full --max-len blocks instead of dropping longer ones",
    "mix_counts": "take this many examples from each --data source (repeat or subsample)",
    "mix_ratios": "mix the --data sources in these proportions",
    "eval_data": "held-out sources for the evaluation loss",
    "full": "full fine-tuning instead of LoRA",
}

PRESETS = {
    "diffutron-cpt": dict(
        epochs=4.0, batch_size=64, grad_accum=2, lr=1e-4, max_len=512, pack=False, full=False,
        lora_r=256, lora_alpha=256.0, lora_dropout=0.05, lora_targets=["Wqkv", "Wo", "Wi"],
        noise_schedule="linear", loss_norm="sequence", bf16=True, save_every=1000, keep_last=2, weight_decay=0.0, warmup_ratio=0.0,
        _note="Diffutron: 4 epochs of ~2.0M sequences = 62,680 steps at batch 64 x 2 on one GPU; "
              "lr and warmup are illegible in the paper (dllm's BERT scripts: 1e-4)"),
}


def check(config: CPTConfig, given: set[str]) -> None:
    if not config.data:
        raise UserError("--data is required: one or more training files, directories or hf:// ids")
    if not config.out:
        raise UserError("--out is required: the directory the run is written to")
    if config.from_scratch and config.model:
        raise UserError("--model and --from-scratch both given; load a model or build a fresh one, not both")
    if not config.from_scratch and not config.model:
        raise UserError("--model is required (or --from-scratch CONFIG.json to train a fresh model)")
    if config.from_scratch and not config.full:
        raise UserError("--from-scratch trains every weight; add --full (LoRA needs a pretrained base)")
    if config.mix_counts and config.mix_ratios:
        raise UserError("--mix-counts and --mix-ratios both given; choose one")
    for name in ("mix_counts", "mix_ratios"):
        values = getattr(config, name)
        if values is not None and len(values) != len(config.data):
            raise UserError(f"--{name.replace('_', '-')} has {len(values)} values for {len(config.data)} --data sources")
    train_cli.check_lora_flags(not config.full, given, "--full")
    train_cli.check_common(config, given)


def cpt_examples_from(sources, config: CPTConfig, tok, ctx) -> list[examples.Examples]:
    """One view of training sequences per source, over its token shard (prepared into the cache
    on first use, or a directory written by `python -m minidiff.data.shards prepare`)."""
    options = shards.cpt_options(config.text_field, config.per_file)
    out = []
    for source in sources:
        shard = shards.open_source(source, "cpt", options, tok, cache_dir=config.shard_cache,
                                   progress=config.progress,
                                   say=lambda text: train_cli.say(ctx.rank, text))
        train_cli.say(ctx.rank, f"{source}: {shard.manifest['read_summary']}")
        if config.pack:
            view = examples.PackExamples(shard, config.max_len, eos_id=tok.eos_id)
        else:
            view = examples.DropExamples(shard, config.max_len, eos_id=tok.eos_id, bos_id=tok.bos_id)
        if not len(view):
            raise UserError(
                f"{source}: no training sequence left: every document is longer than --max-len {config.max_len} "
                "(use --pack or a larger --max-len)" if not config.pack else
                f"{source}: fewer than --max-len {config.max_len} tokens in total, not one packed block")
        train_cli.say(ctx.rank, f"{source}: {len(view):,} sequences of <= {config.max_len} tokens "
                                f"({'packed' if config.pack else 'longer documents dropped'})")
        out.append(view)
    return out


def main(argv=None) -> int:
    from minidiff.data.tokenizer import load_tokenizer

    config, ctx = train_cli.start(CPTConfig, "train_cpt.py", __doc__, HELP, PRESETS, check, argv)

    tok_source = config.tokenizer or config.model or str(Path(config.from_scratch).parent)
    tok = load_tokenizer(tok_source)
    views = cpt_examples_from(config.data, config, tok, ctx)
    train = examples.mix(views, counts=config.mix_counts, ratios=config.mix_ratios, seed=config.seed)
    train, held_out = train_cli.split_held_out(
        train, config, lambda sources: examples.Concat(cpt_examples_from(sources, config, tok, ctx)))
    train_cli.say(ctx.rank, f"{len(train):,} training sequences, {len(held_out):,} evaluation sequences")

    model = train_cli.build_model(config.model, config.from_scratch, tok, config.seed, config.max_len)
    if not config.full:
        train_cli.say(ctx.rank, "LoRA: " + train_cli.apply_lora_from(config, model))

    def collate(batch):
        return collate_cpt(batch, tok.pad_id)

    return train_cli.run_training(config, ctx, model, tok, train, held_out, collate,
                                  lora=not config.full, script="train_cpt.py")


if __name__ == "__main__":
    run_cli(main)
