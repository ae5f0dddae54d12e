"""Two serve.py replicas (one torch thread each) behind nginx against one replica with two threads,
on the same requests: throughput, latency, how the balancer split the requests, every answer 200.

References: none (a measurement); the balancer's configuration is docs/serving.md's ("Operations").
Findings: docs/benchmarks.md ("Serving").

    python benchmarks/bench_replicas.py                      # a small random model on this CPU
    python benchmarks/bench_replicas.py --model DIR --clients 8 32 --rounds 2 --json replicas.json

Both configurations sit behind the same nginx (one upstream each) and run in turns (A, B, A, B):
a burst of N clients at once, each one plain chat completion.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path

from bench_serve import prompts, small_model_dir
from common import banner, parse, table_head, timed, write_results
from serve_acceptance import Endpoint, Served, requests_counted

from minidiff.errors import UserError, run_cli

PROXY = ("proxy_http_version 1.1; proxy_set_header Host $host; proxy_buffering off; proxy_read_timeout 600s; "
         "proxy_next_upstream http_429 http_503 non_idempotent;")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model directory (default: a small random model made for the run)")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="concurrent clients of a burst")
    p.add_argument("--rounds", type=int, default=2, help="bursts per configuration and client count")
    p.add_argument("--max-tokens", type=int, default=64, help="each answer's tokens (2 blocks of 32, a step each)")
    p.add_argument("--dtype", default="float32", help="serve.py's --dtype")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="the nginx binary")
    args = parse(p, argv)
    if min(args.clients) < 1 or args.rounds < 1 or args.max_tokens < 1:
        raise UserError(f"--clients, --rounds and --max-tokens must be integers >= 1, got {args.clients}, "
                        f"{args.rounds} and {args.max_tokens}.")
    if not Path(args.nginx).is_file():
        raise UserError(f"nginx is not at {args.nginx}; install it (apt-get install nginx) or give --nginx PATH.")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def balancer(nginx: str, directory: Path, upstreams: dict[str, list[int]]) -> tuple[subprocess.Popen, dict]:
    """nginx in the foreground with one listening port per upstream (least_conn, docs/serving.md's proxy)."""
    ports, blocks = {name: free_port() for name in upstreams}, []
    for name, servers in upstreams.items():
        members = " ".join(f"server 127.0.0.1:{port};" for port in servers)
        blocks.append(f"upstream {name} {{ least_conn; {members} }}\n  server {{ listen 127.0.0.1:{ports[name]}; "
                      f"location / {{ proxy_pass http://{name}; {PROXY} }} }}")
    temps = " ".join(f"{kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    conf, log = directory / "nginx.conf", directory / "error.log"
    conf.write_text(f"daemon off; worker_processes 1; pid {directory / 'nginx.pid'}; error_log {log};\n"
                    f"events {{ worker_connections 1024; }}\nhttp {{\n  access_log off; {temps}\n  "
                    + "\n  ".join(blocks) + "\n}\n")
    process = subprocess.Popen([nginx, "-p", str(directory), "-c", str(conf), "-e", str(log)],
                               stderr=subprocess.DEVNULL)
    for port in ports.values():
        while process.poll() is None and not listening(port):
            time.sleep(0.05)
    if process.poll() is not None:
        raise UserError(f"{nginx} did not start: {log.read_text()[-300:] if log.exists() else 'no log'!r}.")
    return process, ports


def burst(endpoint: Endpoint, texts: list[str], fields: dict) -> dict:
    """All the requests at once, one client thread each: wall seconds, each latency, tokens, statuses."""
    barrier = threading.Barrier(len(texts))

    def client(prompt: str):
        barrier.wait()
        (status, reply), seconds = timed(lambda: endpoint.chat(prompt, **fields))
        return status, seconds, reply["usage"]["completion_tokens"] if status == 200 else 0

    with ThreadPoolExecutor(len(texts)) as pool:
        answers, wall = timed(lambda: list(pool.map(client, texts)))
    return {"wall": wall, "latencies": [a[1] for a in answers], "tokens": sum(a[2] for a in answers),
            "ok": sum(a[0] == 200 for a in answers)}


def answered(server: Served) -> int:
    """The chat completions a replica answered 200 (its /metrics)."""
    return requests_counted(server)[("/v1/chat/completions", "200")]


def measure(args, model_dir: Path, scratch: Path) -> tuple[dict, list[int]]:
    """Both configurations' bursts, in turns; the requests each replica answered."""
    fields = dict(max_tokens=args.max_tokens, steps=args.max_tokens, block_length=32, temperature=0)
    flags, configs = ["--dtype", args.dtype, "--log-level", "warning"], {"2 replicas x 1 thread": [],
                                                                          "1 replica x 2 threads": []}
    with ExitStack() as stack:
        replicas = [stack.enter_context(closing(Served(model_dir, *flags, threads=1))) for _ in range(2)]
        single = stack.enter_context(closing(Served(model_dir, *flags, threads=2)))
        nginx, ports = balancer(args.nginx, scratch, {"replicas": [r.port for r in replicas], "single": [single.port]})
        stack.callback(nginx.wait, timeout=30)
        stack.callback(nginx.terminate)  # nginx's fast shutdown, before the replicas' SIGTERM
        endpoints = {name: Endpoint("127.0.0.1", ports[upstream], model_dir.name)
                     for name, upstream in zip(configs, ("replicas", "single"))}
        for endpoint in endpoints.values():
            burst(endpoint, prompts(4), fields)  # warm up
        before = [answered(r) for r in replicas]
        for _ in range(args.rounds):
            for clients in args.clients:
                for name, endpoint in endpoints.items():
                    configs[name].append({"clients": clients, **burst(endpoint, prompts(clients), fields)})
        return configs, [answered(r) - b for r, b in zip(replicas, before)]


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else small_model_dir(Path(scratch) / "small")
        print(banner(), flush=True)
        configs, split = measure(args, model_dir, Path(scratch))
    rows = []
    for name, runs in configs.items():
        for clients in args.clients:
            mine = [r for r in runs if r["clients"] == clients]
            latencies = sorted(x for r in mine for x in r["latencies"])  # p95: the nearest rank below
            rows.append({"config": name, "clients": clients, "bursts": len(mine),
                         "tokens_per_s": [r["tokens"] / r["wall"] for r in mine],
                         "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
                         "ok": sum(r["ok"] for r in mine), "requests": clients * len(mine)})
    print("\n" + table_head("configuration", "clients", "tokens/s per burst", "latency p50 s", "p95 s",
                            "answered 200", right=5))
    for r in rows:
        print(f"| {r['config']} | {r['clients']} | {' / '.join(f'{x:.0f}' for x in r['tokens_per_s'])} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ok']} of {r['requests']} |")
    print(f"\nthe replicas' share of the {sum(split)} requests sent to them: {split}; "
          f"load average after: {[round(x, 1) for x in os.getloadavg()]}")
    write_results(args.json, {"settings": vars(args), "rows": rows, "split": split})
    return 0


if __name__ == "__main__":
    run_cli(main)
