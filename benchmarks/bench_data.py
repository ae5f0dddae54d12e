"""Memory and speed of the CPT data path: token shards against the list-based pipeline.

References: nanoGPT's tokenise-once, memory-map-everywhere data path (minidiff.data.shards).

    python benchmarks/bench_data.py                              # 2M and 20M tokens, --pack, one step
    python benchmarks/bench_data.py --sizes 20000 60000          # smoke size
    python benchmarks/bench_data.py --json data.json             # the figures as JSON too

A synthetic Turkish-like corpus (random words from a fixed list, documents of 5 to 300 words)
of each size is written to a temporary directory, with a small BPE tokenizer trained on it
and a tiny model config. Each measurement is a fresh `train_cpt.py --pack --max-steps 1`
process; its peak RSS comes from os.wait4:
- reference: the list pipeline (read_documents -> tokenize_documents -> the list oracle's
  cpt_examples -> mix_sources, tests/data_oracle.py: Python lists of ints), same flags;
- shards, cold cache: the first run tokenises into an empty cache;
- shards, warm cache: a second run maps the cached shards.
Growth per token = (peak RSS at the large size - at the small size) / (token difference).
Also: shards.prepare's tokens/s in this process (cold: writing; warm: the cache check) and the
warm run's wall time to the end of step 1. Reference and shard runs must log the same step-1 loss.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import add_flags, banner, timed, write_results

from minidiff.data import shards
from minidiff.data.tokenizer import train_tokenizer
from minidiff.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("Türkiye Cumhuriyeti yılında kuruldu başkenti Ankara oldu İstanbul Boğazı Avrupa ile Asya'yı "
         "birbirinden ayırır Çocuklar okul bahçesinde neşeyle oyun oynuyorlardı Güneşli bir günde ağaçların "
         "gölgesinde kitap okumak çok güzeldir Öğretmenimiz bize ışığın hızını ve ses dalgalarını anlattı "
         "Şehrin sokaklarında yürürken eski dostumla karşılaştım Ilık rüzgâr denizden esiyor martılar "
         "gökyüzünde süzülüyordu Yarın sabah erkenden kalkıp köye gideceğiz Bu kitabı okuduktan sonra "
         "düşüncelerim tamamen değişti Ekonomi sağlık spor siyaset haberleri her gün gazetede yer alır "
         "meclis halk millet ordu bağımsızlık egemenlik cumhuriyet devlet hükümet").split()

REFERENCE = """
import sys
sys.path.insert(0, {tests!r})
import data_oracle as oracle
import train_cpt
from minidiff.data import readers
from minidiff.data.tokenizer import tokenize_documents
from minidiff.errors import run_cli

def lists_from(sources, config, tok, ctx):  # the examples as Python lists (tests/data_oracle.py)
    out = []
    for source in sources:
        docs = readers.read_documents(source, field=config.text_field, per="file" if config.per_file else "line")
        ids = tokenize_documents(docs.texts, tok)
        out.append(oracle.cpt_examples(ids, config.max_len, "pack" if config.pack else "drop",
                                       eos_id=tok.eos_id, bos_id=None if config.pack else tok.bos_id))
    return out

class Lists:
    mix = staticmethod(oracle.mix_sources)
train_cpt.cpt_examples_from = lists_from
train_cpt.examples = Lists
sys.argv = ["train_cpt.py"] + sys.argv[1:]
run_cli(train_cpt.main)
"""


def write_corpus(path: Path, tokens: int, tokens_per_word: float, seed: int) -> None:
    """Documents of 5..300 random words until about `tokens` tokens."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    target_words = int(tokens / tokens_per_word)
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < target_words:
            lengths = rng.integers(5, 301, size=1000)
            lengths = lengths[np.cumsum(lengths) <= max(target_words - written, int(lengths[0]))]
            picks = words[rng.integers(0, len(words), size=int(lengths.sum()))]
            cuts = np.cumsum(lengths)[:-1]
            handle.write("\n".join(" ".join(doc) for doc in np.split(picks, cuts)) + "\n")
            written += int(lengths.sum())


def run_measured(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(peak RSS in MiB, wall seconds, stderr) of a fresh process."""

    def run():
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        return os.waitstatus_to_exitcode(status), usage, stderr

    (returncode, usage, stderr), wall = timed(run)
    if returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({returncode}):\n{stderr[-3000:]}")
    return usage.ru_maxrss / 1024, wall, stderr  # ru_maxrss is in KiB on Linux


def first_loss(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r["loss"] for r in rows if "loss" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs=2, default=[2e6, 2e7], help="corpus sizes in tokens")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--no-reference", action="store_true", help="skip the list-pipeline runs")
    add_flags(parser, threads=1, threads_help="OMP threads of the training processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    tok, tokens_per_word = setup(work, args.vocab)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    results = [measure_size(work, index, size, tok, tokens_per_word, args, env) for index, size in enumerate(args.sizes)]
    report(results, args, tok)
    shutil.rmtree(work, ignore_errors=True)


def setup(work: Path, vocab: int):
    """A BPE tokenizer trained on the word list and a tiny model config, in `work`."""
    sample = [" ".join(np.random.default_rng(i).choice(WORDS, 40)) for i in range(400)]
    tok = train_tokenizer(sample, vocab, work / "tok")
    tokens_per_word = len(tok.encode(" ".join(sample), add_special_tokens=False)) / (40 * 400)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=512, local_attention=16,
                         global_attn_every_n_layers=2, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                         bos_token_id=tok.bos_id, cls_token_id=tok.eos_id, sep_token_id=tok.eos_id,
                         mask_token_id=tok.mask_id)
    (work / "config.json").write_text(json.dumps(config.to_dict()))
    (work / "reference.py").write_text(REFERENCE.format(tests=str(ROOT / "tests")))
    return tok, tokens_per_word


def measure_size(work: Path, index: int, size: float, tok, tokens_per_word: float, args, env) -> dict:
    """One corpus size: tokenisation throughput, then the cold, warm and reference training processes."""
    corpus = work / f"corpus{index}.txt"
    write_corpus(corpus, int(size), tokens_per_word, seed=index)
    cache = work / f"cache{index}"
    flags = ["--from-scratch", str(work / "config.json"), "--full", "--tokenizer", str(work / "tok"),
             "--data", str(corpus), "--pack", "--max-len", str(args.max_len), "--batch-size", str(args.batch_size),
             "--max-steps", "1", "--no-progress", "--shard-cache", str(cache)]
    row = {"size": size}

    def prepare():
        return shards.prepare(corpus, "cpt", shards.cpt_options(), tok, cache_dir=work / f"throughput{index}")

    entry, cold = timed(prepare)
    row["tokens"] = entry.manifest["tokens"]
    row["cold_tok_s"] = row["tokens"] / cold
    row["warm_tok_s"] = row["tokens"] / timed(prepare)[1]
    row["cold_rss"], row["cold_s"], _ = run_measured([sys.executable, "train_cpt.py", *flags, "--out", str(work / f"cold{index}")], env)
    row["warm_rss"], row["warm_s"], _ = run_measured([sys.executable, "train_cpt.py", *flags, "--out", str(work / f"warm{index}")], env)
    loss = first_loss(work / f"warm{index}")
    assert loss == first_loss(work / f"cold{index}")
    if not args.no_reference:
        row["ref_rss"], row["ref_s"], _ = run_measured(
            [sys.executable, str(work / "reference.py"), *flags, "--out", str(work / f"ref{index}")], env)
        assert loss == first_loss(work / f"ref{index}"), "the list pipeline and the shards trained on different data"
    print(f"{row['tokens']:,} tokens: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k not in ("size", "tokens")),
          file=sys.stderr, flush=True)
    return row


def report(results: list[dict], args, tok) -> None:
    """The table (growth per extra token between the two sizes) and the JSON."""
    small, large = results
    extra = large["tokens"] - small["tokens"]
    names = [("reference: Python lists", "ref")] * (not args.no_reference) + [
        ("shards, cold cache", "cold"), ("shards, warm cache", "warm")]
    pipelines = [{"pipeline": name, "small_rss_mib": small[f"{key}_rss"], "large_rss_mib": large[f"{key}_rss"],
                  "growth_bytes_per_token": (large[f"{key}_rss"] - small[f"{key}_rss"]) * 2**20 / extra,
                  "small_s": small[f"{key}_s"], "large_s": large[f"{key}_s"]} for name, key in names]
    print(f"\nbench_data: train_cpt.py --pack --max-len {args.max_len} --batch-size {args.batch_size} --max-steps 1, "
          f"tiny model, OMP threads {args.threads}\n{banner()}\n")
    print("| pipeline | peak RSS, small corpus (MiB) | peak RSS, large corpus (MiB) | growth per extra token (bytes) "
          "| wall time small / large (s) |")
    print("|---|---|---|---|---|")
    for p in pipelines:
        print(f"| {p['pipeline']} | {p['small_rss_mib']:,.0f} | {p['large_rss_mib']:,.0f} | "
              f"{p['growth_bytes_per_token']:.2f} | {p['small_s']:.1f} / {p['large_s']:.1f} |")
    print(f"\ncorpora: {small['tokens']:,} and {large['tokens']:,} tokens (vocab {tok.vocab_size})")
    for row in results:
        print(f"{row['tokens']:,} tokens: tokenisation {row['cold_tok_s']:,.0f} tokens/s cold (shards.prepare), "
              f"cache check {row['warm_tok_s']:,.0f} tokens/s warm; warm run start to end of step 1: {row['warm_s']:.1f} s")
    write_results(args.json, {"settings": {k: getattr(args, k) for k in ("max_len", "batch_size", "vocab", "threads")},
                              "sizes": results, "pipelines": pipelines})


if __name__ == "__main__":
    main()
