"""Serving throughput and latency: serve.py under 1, 4, 16, 64 concurrent clients against the same
requests run one after another through speed.sampling.generate.

References: none (a measurement); the server is serve.py (docs/serving.md). Findings:
docs/benchmarks.md ("Serving").

    python benchmarks/bench_serve.py                        # a small random model on this CPU
    python benchmarks/bench_serve.py --clients 1 4 16 64 --threads 1 --json serve.json
    python benchmarks/bench_serve.py --model DIR             # a trained model directory

At temperature 0 each answer is compared with its prompt sent alone to the server, and with
generate's alone, served and in one batch of generate (timed: sample.py --batch-size): with
--length-bucket all equal bit for bit, with 0 a row may differ by rounding under padding
(docs/serving.md, "Batch invariance").
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import torch
from common import banner, parse, tiny_shape, write_results

from minidiff.data.tokenizer import train_tokenizer
from minidiff.errors import run_cli
from minidiff.model import ModernBertMLM
from minidiff.plumbing.checkpoint import save_pretrained
from minidiff.plumbing.sampling_cli import answer_ids, answer_text, load_for_sampling, prompt_ids
from minidiff.speed.sampling import FastConfig, generate

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "benchmarks" / "data" / "morphology_tr.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model directory (default: a small random model made for the run)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent clients per row")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--dtype", default="float32", help="as serve.py's --dtype (both sides use it)")
    p.add_argument("--length-bucket", type=int, default=16, help="serve.py's and generate's --length-bucket "
                   "(0: rows padded to the batch's longest; run with several to see the cost of batch invariance)")
    return parse(p, argv, threads=1, threads_help="torch threads of the server and of the baseline")


def small_model_dir(directory: Path) -> Path:
    """A tokenizer trained on the benchmark's Turkish prompts and a random tiny-shaped model sized to it."""
    texts = [json.loads(line)["prompt"] for line in TEXTS.read_text(encoding="utf-8").splitlines()]
    tok = train_tokenizer(texts, vocab_size=1000, out_dir=directory)
    torch.manual_seed(0)
    save_pretrained(ModernBertMLM(tiny_shape(vocab_size=tok.vocab_size)).eval(), directory)
    return directory


def prompts(count: int) -> list[str]:
    rows = [json.loads(line)["prompt"] for line in TEXTS.read_text(encoding="utf-8").splitlines()]
    return [rows[i % len(rows)] for i in range(count)]


class Server:
    """serve.py on 127.0.0.1 (a free port) with the benchmark's settings; `close` stops it."""

    def __init__(self, model_dir: Path, args, batch_size: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        command = [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", "0", "--device", "cpu", "--dtype", args.dtype, "--batch-size", str(batch_size),
                   "--queue-size", str(batch_size), "--log-level", "warning", "--max-new-tokens", str(args.max_tokens),
                   "--steps", str(args.steps), "--block-length", str(args.block_length), "--repetition-penalty",
                   str(args.repetition_penalty), "--temperature", "0"]
        command += ["--length-bucket", str(args.length_bucket)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            raise RuntimeError(f"serve.py did not start (it printed {line!r})")
        parts = urlsplit(line.split()[-1])
        self.host, self.port, self.model = parts.hostname, parts.port, model_dir.name

    def ask(self, prompt: str) -> dict:
        """One streamed chat completion: its text, tokens, first-chunk and total seconds."""
        start = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "stream_options": {"include_usage": True}}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply, text, first, tokens = connection.getresponse(), "", None, 0
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            first = first or time.perf_counter() - start
            data = json.loads(line[6:])
            text += "".join(choice["delta"].get("content", "") for choice in data["choices"])
            tokens = data.get("usage", {}).get("completion_tokens", tokens)
        connection.close()
        return {"text": text, "tokens": tokens, "first": first, "total": time.perf_counter() - start}

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def concurrent(server: Server, texts: list[str]) -> dict:
    """All the requests at once, one client thread each."""
    barrier = threading.Barrier(len(texts))

    def client(prompt: str) -> dict:
        barrier.wait()
        return server.ask(prompt)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(client, texts))
    return {"wall": time.perf_counter() - start, "answers": answers}


def one_by_one(model, tok, precision, texts: list[str], config: FastConfig) -> dict:
    """The same requests one after another through generate (batch 1), as sample.py runs one."""
    answers = []
    start = time.perf_counter()
    for prompt in texts:
        began = time.perf_counter()
        with precision.autocast():
            out = generate(model, [prompt_ids(tok, prompt, raw=False)], config, mask_id=tok.mask_id,
                           eos_id=tok.eos_id, tokenizer=tok, pad_id=tok.pad_id)
        ids = out.answers()[0]
        answers.append({"text": answer_text(tok, ids), "tokens": len(answer_ids(tok, ids)),
                        "total": time.perf_counter() - began})
    return {"wall": time.perf_counter() - start, "answers": answers}


def batched(model, tok, precision, texts: list[str], config: FastConfig) -> dict:
    """The same prompts as one batch of generate (sample.py --batch-size): its wall time, and its
    rows to hold against each prompt alone."""
    start = time.perf_counter()
    with precision.autocast():
        out = generate(model, [prompt_ids(tok, p, raw=False) for p in texts], config, mask_id=tok.mask_id,
                       eos_id=tok.eos_id, tokenizer=tok, pad_id=tok.pad_id)
    return {"wall": time.perf_counter() - start, "texts": [answer_text(tok, ids) for ids in out.answers()]}


def row(clients: int, served: dict, alone: dict, together: dict, served_alone: list[str]) -> dict:
    firsts = [a["first"] for a in served["answers"]]
    totals = [a["total"] for a in served["answers"]]
    tokens = sum(a["tokens"] for a in served["answers"])
    return {"clients": clients, "tokens": tokens, "server_wall_s": served["wall"],
            "server_tokens_per_s": tokens / served["wall"],
            "first_block_median_s": statistics.median(firsts), "first_block_max_s": max(firsts),
            "total_median_s": statistics.median(totals), "total_max_s": max(totals),
            "one_by_one_wall_s": alone["wall"], "one_by_one_tokens_per_s": tokens / alone["wall"],
            "speedup": alone["wall"] / served["wall"], "generate_batch_wall_s": together["wall"],
            "served_equal_alone": sum(a["text"] == b["text"] for a, b in zip(served["answers"], alone["answers"])),
            "served_equal_served_alone": sum(a["text"] == b for a, b in zip(served["answers"], served_alone)),
            "batch_equal_alone": sum(t == b["text"] for t, b in zip(together["texts"], alone["answers"]))}


def table(rows: list[dict]) -> str:
    lines = ["| clients | tokens | server: wall s | tokens/s | first block median / max s | answer median / max s "
             "| one by one: wall s | tokens/s | speedup | generate's one batch: wall s "
             "| equal to the server alone | equal to generate alone: served, generate's batch |",
             "|" + "---:|" * 11 + "---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['tokens']} | {r['server_wall_s']:.2f} | {r['server_tokens_per_s']:.0f} | "
                     f"{r['first_block_median_s']:.2f} / {r['first_block_max_s']:.2f} | "
                     f"{r['total_median_s']:.2f} / {r['total_max_s']:.2f} | {r['one_by_one_wall_s']:.2f} | "
                     f"{r['one_by_one_tokens_per_s']:.0f} | {r['speedup']:.1f}x | {r['generate_batch_wall_s']:.2f} | "
                     f"{r['served_equal_served_alone']} of {r['clients']} | "
                     f"{r['served_equal_alone']}, {r['batch_equal_alone']} of {r['clients']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else small_model_dir(Path(scratch) / "small")
        options = argparse.Namespace(model=str(model_dir), device="cpu", dtype=args.dtype, no_packed_weights=False)
        model, tok, precision = load_for_sampling(options)
        config = FastConfig(max_new_tokens=args.max_tokens, steps=args.steps, block_length=args.block_length,
                            repetition_penalty=args.repetition_penalty, length_bucket=args.length_bucket)
        print(banner(), flush=True)
        server, rows = Server(model_dir, args, max(args.clients)), []
        try:
            server.ask("Merhaba")  # warm up (first forward's allocations)
            for clients in args.clients:
                texts = prompts(clients)
                served = concurrent(server, texts)
                alone = one_by_one(model, tok, precision, texts, config)
                served_alone = [server.ask(text)["text"] for text in texts]  # untimed: each prompt alone
                rows.append(row(clients, served, alone, batched(model, tok, precision, texts, config), served_alone))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            server.close()
    print(f"\n{table(rows)}\n\nload average after: {os.getloadavg()}")
    write_results(args.json, {"settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    run_cli(main)
