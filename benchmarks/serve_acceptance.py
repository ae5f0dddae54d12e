"""The server's acceptance checks on a trained model, made as a client makes them against serve.py
started with a key, --max-tokens-limit 448 and --batch-size 4: one line per check (PASS or FAIL,
what was measured, the limit); exit status 1 when one fails.

References: none (a client's checks); the server: docs/serving.md. Findings: docs/benchmarks.md ("Serving").

    python benchmarks/serve_acceptance.py --model runs/sft2
    python benchmarks/serve_acceptance.py --model DIR --dtype float32 --threads 1 --json acceptance.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import openai
import torch
from common import banner, parse, seconds, timed, write_results
from prometheus_client.parser import text_string_to_metric_families
from roofline import Counter as FlopCounter
from roofline import measure_machine
from tokenizers import Tokenizer

from minidiff.errors import UserError, run_cli
from minidiff.plumbing.sampling_cli import load_for_sampling, prompt_ids

ROOT = Path(__file__).resolve().parents[1]
KEY, ROUTES = "acceptance-key", ("/health", "/metrics", "/v1/chat/completions", "/v1/completions")
PROMPTS = ["Selam!", "Sen nesin?", "Nasılsın bugün?", "Karmaşık.", "Türkiye'nin başkenti neresidir?",
           "Bana kısa bir şiir yazar mısın?", "Merhaba, randevum için geldim.", "İstanbul'da ne yapılır?",
           "Yarın hava nasıl olacak, biliyor musun?", "Çay mı kahve mi, hangisini seversin?",
           "Bir kitap önerir misin? Kısa ve eğlenceli olsun lütfen.", "ISO 22000 nedir ve ne işe yarar?",
           "Anneme doğum günü için ne hediye almalıyım, bir fikrin var mı?",
           "Sanırım sevgiye programlanabilirim.",
           "Öğretmenimiz ışığın hızını anlattı; bana da kısaca anlatır mısın, ne kadar hızlıdır?",
           "Türkçede ünlü uyumu nedir, iki örnekle açıklar mısın? Okulda öğrendim ama unuttum."]  # 16
FOUR_BLOCKS = dict(max_tokens=128, block_length=32, steps=128)  # the 4-block request
LONG_BLOCK = dict(max_tokens=440, block_length=440, steps=220)  # one block of 440 positions, 2 per step
SHORT = dict(max_tokens=16, block_length=16, steps=16)  # the 16-token request
LOOPED = dict(max_tokens=16, block_length=16, steps=8)  # the 8 clients' requests (raw prompts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained model directory (tokenizer.json, config.json, weights)")
    p.add_argument("--dtype", default="auto", help="serve.py's --dtype (default: its own, auto)")
    return parse(p, argv, threads=0, threads_help="the server's torch threads (0: torch's default)")


class Endpoint:
    """An HTTP address (serve.py or a balancer); every request counted by route and status."""

    def __init__(self, host: str, port: int, model: str, key: str | None = None):
        self.host, self.port, self.model, self.key = host, port, model, key
        self.tally, self.lock = Counter(), threading.Lock()

    def count(self, path: str, status: int) -> None:
        with self.lock:
            self.tally[(path if path in ROUTES else "other", str(status))] += 1

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers=None, key=True):
        """(status, the reply's JSON, or its text when not JSON) of one request."""
        auth = {"Authorization": f"Bearer {self.key}"} if key and self.key else {}
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        connection.request(method, path, data, {"Content-Type": "application/json", **auth, **(headers or {})})
        reply = connection.getresponse()
        status, text = reply.status, reply.read().decode()
        connection.close()
        self.count(path, status)
        return status, json.loads(text) if text[:1] in ("{", "[") else text

    def chat(self, prompt: str, **fields):
        return self.call("POST", "/v1/chat/completions",
                         {"model": self.model, "messages": [{"role": "user", "content": prompt}], **fields})

    def complete(self, prompt, **fields):
        return self.call("POST", "/v1/completions", {"model": self.model, "prompt": prompt, **fields})

    def openai(self) -> openai.OpenAI:
        hook = lambda r: self.count(r.request.url.path, r.status_code)  # noqa: E731
        return openai.OpenAI(base_url=f"http://{self.host}:{self.port}/v1", api_key=self.key or "none",
                             max_retries=0, timeout=600,
                             http_client=openai.DefaultHttpxClient(event_hooks={"response": [hook]}))


class Served(Endpoint):
    """serve.py on 127.0.0.1 (a free port) with the given flags; its log in a temporary file."""

    def __init__(self, model_dir: Path, *flags: str, key: str | None = None, threads: int = 0):
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir),
                                         "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *flags]
                                        + (["--api-key", key] if key else []),
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            self.log.seek(0)
            raise UserError(f"serve.py did not start on {model_dir}: {self.log.read()[-400:]!r}")
        parts = urlsplit(line.split()[-1])
        super().__init__(parts.hostname, parts.port, model_dir.name, key)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=90)
        self.log.close()


def text(reply: dict, i: int = 0) -> str:
    choice = reply["choices"][i]
    return choice["message"]["content"] if "message" in choice else choice["text"]


@torch.no_grad()
def batching_ceiling(args) -> str:
    """What batching can give at most here: the model's step (logits at one block of 32) on the
    prompts' median canvas (chat prompt + 128 new tokens), 16 rows against 1, in serve.py's
    precision; its GFLOP/s beside this machine's matmul peak, measured before the server starts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = argparse.Namespace(model=args.model, device="cpu", dtype=args.dtype, no_packed_weights=False)
    model, tok, precision = load_for_sampling(options)
    length = sorted(len(prompt_ids(tok, p, raw=False)) for p in PROMPTS)[len(PROMPTS) // 2] + 128
    rates = {}
    for rows in (1, 16):
        ids, mask = torch.randint(5, model.config.vocab_size, (rows, length)), torch.ones(rows, length, dtype=torch.long)
        at = torch.arange(length - 32, length).expand(rows, -1)  # [rows, 32]
        with precision.autocast():
            step = lambda: model.logits_at_positions(ids, mask, at)  # noqa: E731
            step()
            best = min(seconds(step, None, 20))
            with FlopCounter() as count:
                step()
        rates[rows] = count.flops / best
    peak = measure_machine(torch.device("cpu"), 1024, 1 << 26)
    bf16 = torch.bfloat16 in (precision.weights, precision.autocast_dtype)
    peak = peak["matmul_flops_bfloat16" if bf16 else "matmul_flops_float32"]
    return (f"the step alone gives at most {rates[16] / rates[1]:.2f}x at 16 rows of {length} positions "
            f"({rates[1] / 1e9:.0f} -> {rates[16] / 1e9:.0f} GFLOP/s; matmul peak {peak / 1e9:.0f})")


def check_batching(s: Served, tokens: Tokenizer, ceiling: str) -> tuple[list, dict]:
    """The 16 prompts one by one, then at once; plain against streamed; usage against the text's tokens."""
    alone, one_by_one = timed(lambda: {p: s.chat(p)[1] for p in PROMPTS})
    barrier = threading.Barrier(len(PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together, at_once = timed(lambda: list(pool.map(lambda p: (barrier.wait(), s.chat(p)[1])[1], PROMPTS)))
    equal, client, streamed = sum(text(r) == text(alone[p]) for r, p in zip(together, PROMPTS)), s.openai(), []
    for p in PROMPTS[::4]:
        ask = dict(model=s.model, messages=[{"role": "user", "content": p}])
        chunks = client.chat.completions.create(**ask, stream=True)
        streamed.append(client.chat.completions.create(**ask).choices[0].message.content
                        == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    # the text's tokens as it follows the generation prompt's newline (no word-start marker of its own)
    counted = [(r["usage"]["completion_tokens"], len(tokens.encode("\n" + text(r)).ids) - len(tokens.encode("\n").ids))
               for r in alone.values()]
    return [("plain = streamed (the OpenAI client)", all(streamed), f"{sum(streamed)} of {len(streamed)}", "all"),
            ("16 different prompts at once: each equal to the prompt alone", equal == 16, f"{equal} of 16", "16 of 16"),
            ("16 different prompts at once: faster than one by one", one_by_one / at_once >= 2,
             f"{one_by_one:.2f} s one by one, {at_once:.2f} s at once: {one_by_one / at_once:.2f}x; {ceiling}", ">= 2x"),
            ("usage.completion_tokens = the tokens of the text", all(a == b for a, b in counted),
             f"{sum(a == b for a, b in counted)} of {len(counted)} ({sum(a for a, _ in counted)} tokens)", "all")], \
        {p: text(r) for p, r in alone.items()}


def check_keys_and_fields(s: Served, greedy: dict) -> list:
    body, want = {"model": s.model, "messages": [{"role": "user", "content": PROMPTS[1]}]}, greedy[PROMPTS[1]]
    unauthorized = [s.call("POST", "/v1/chat/completions", body, key=False)[0],
                    s.call("POST", "/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"})[0]]
    client = s.openai().chat.completions.create(**body).choices[0].message.content
    nulls = s.chat(PROMPTS[1], seed=None, temperature=None, max_tokens=None)
    refused = [(f, *s.chat(PROMPTS[0], **{f: v})) for f, v in (
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("response_format", {"type": "json_object"}), ("logprobs", True), ("logit_bias", {"10": 5}))]
    refused.append(("echo", *s.complete(PROMPTS[0], echo=True)))
    picks = {f: sum(text(s.chat(p, temperature=1, **{f: v})[1]) == greedy[p] for p in PROMPTS[4:8])
             for f, v in (("top_k", 1), ("top_p", 1e-6))}
    return [("no key, a wrong key: 401; the OpenAI client with the key works", unauthorized == [401, 401]
             and client == want, f"{unauthorized}; the client's answer equal to alone: {client == want}",
             "401, 401, equal"),
            ("seed, temperature, max_tokens null: the defaults", nulls[0] == 200 and text(nulls[1]) == want,
             f"{nulls[0]}, equal to the request without them: {text(nulls[1]) == want}", "200, equal"),
            ("tools, response_format json_object, logprobs, logit_bias, echo: 400 naming the field",
             all(st == 400 and r["error"]["param"] == f for f, st, r in refused),
             ", ".join(f"{f} {st} param={r['error']['param']}" for f, st, r in refused), "400, param = the field"),
            ("temperature 1 with top_k 1, with top_p 1e-6: the greedy answer (4 prompts)",
             all(n == 4 for n in picks.values()), ", ".join(f"{f}: {n} of 4" for f, n in picks.items()), "4 of 4")]


def check_choices_and_suffix(s: Served, greedy: dict) -> list:
    n3, pair = s.chat(PROMPTS[6], n=3)[1], [PROMPTS[2], PROMPTS[7]]
    listed, alone = s.complete(pair)[1], [text(s.complete(p)[1]) for p in pair]
    fills = [[s.complete("Ankara", suffix=suffix, max_tokens=16, temperature=0)[1] for _ in range(2)]
             for suffix in (" güzel bir şehirdir.", " ve İzmir Türkiye'nin kentleridir.")]
    (a, a2), (b, _) = [[text(r) for r in pair_] for pair_ in fills]
    sizes = [r["usage"]["completion_tokens"] for r in (fills[0][0], fills[1][0])]
    n_equal = sum(text(n3, i) == greedy[PROMPTS[6]] for i in range(3))
    list_equal = sum(text(listed, i) == t for i, t in enumerate(alone))
    return [("n=3 and a list of two prompts: each choice equal to alone", n_equal == 3 and list_equal == 2,
             f"n=3: {n_equal} of 3, list: {list_equal} of 2", "3 of 3, 2 of 2"),
            ("suffix fills the middle, depends on the suffix, same twice at temperature 0",
             a == a2 and a != b and sizes == [16, 16], f"fills {a!r} / {b!r} ({sizes} tokens); twice equal: {a == a2}",
             "16 tokens, different, equal")]


def check_limits_and_bad_input(s: Served, greedy: dict) -> list:
    big, chat = json.dumps({"model": s.model, "prompt": "x" * (2 << 20)}).encode(), "/v1/chat/completions"
    limits = [s.chat(PROMPTS[0], max_tokens=449), s.call("POST", "/v1/completions", raw=big),
              s.chat(PROMPTS[0], stop=["a", "b", "c", "d", "e"]), s.chat(PROMPTS[0], trace=True)]
    bad = [s.call("POST", chat, raw=b"{not json"), s.call("POST", chat, {"messages": []}),
           s.call("POST", chat, {"model": "other", "messages": [{"role": "user", "content": "x"}]}),
           s.call("POST", chat, {"model": s.model, "messages": [{"role": "assistant", "content": "x"}]}),
           s.chat(PROMPTS[0], temperature="hot"), s.complete([]), s.chat(PROMPTS[0], n=0),
           s.call("POST", chat, raw=b"{}", headers={"Content-Type": "text/plain"}), s.call("GET", chat),
           s.call("GET", "/v1/nothing")]
    after = s.chat(PROMPTS[0])[0]
    return [("max_tokens 449: 400; a 2 MiB body: 413; five stop strings: 400; trace: 400",
             [st for st, _ in limits] == [400, 413, 400, 400], str([st for st, _ in limits]), "[400, 413, 400, 400]"),
            ("bad input: 4xx with an error object, then a request is answered",
             all(400 <= st < 500 and "error" in r for st, r in bad) and after == 200,
             f"{[st for st, _ in bad]}, then {after}", "every 4xx, then 200")]


def check_turns(s: Served, greedy: dict) -> list:
    four = lambda: s.chat(PROMPTS[4], **FOUR_BLOCKS)  # noqa: E731
    alone, stop, loops = timed(four)[1], threading.Event(), []

    def loop(i: int) -> None:
        while not stop.is_set():
            loops.append(s.complete(f"{i}. İzmir", **LOOPED)[0])

    with ThreadPoolExecutor(8) as pool:
        [pool.submit(loop, i) for i in range(8)]
        time.sleep(1.0)  # the 8 clients under way
        (_, reply), busy = timed(four)
        stop.set()
    limit, tokens = max(4 * alone, alone + 30), reply["usage"]["completion_tokens"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(timed, lambda: s.complete("Ankara", **LONG_BLOCK))
        while s.call("GET", "/health")[1]["active"] == 0:
            time.sleep(0.01)
        time.sleep(0.2)  # the long block under way
        (short_status, _), beside = timed(lambda: s.chat(PROMPTS[3], **SHORT))
        (long_status, _), long_s = running.result()
    short_alone = timed(lambda: s.chat(PROMPTS[3], **SHORT))[1]
    return [("a 4-block request while 8 clients loop 16-token requests of another shape", busy <= limit
             and tokens > 96, f"{busy:.2f} s ({alone:.2f} s alone; {tokens} tokens; {len(loops)} short requests, "
             f"statuses {sorted(set(loops))})", f"<= {limit:.1f} s"),
            ("a 16-token request beside a single 440-token block", beside <= 3 and short_status == long_status == 200,
             f"{beside:.2f} s ({short_alone:.2f} s alone; the block {long_s:.2f} s)", "<= 3 s")]


def requests_counted(s: Endpoint) -> Counter:
    """(route, status) -> the server's minidiff_requests_total, parsed by prometheus_client."""
    families = text_string_to_metric_families(s.call("GET", "/metrics")[1])
    return Counter({(x.labels["route"], x.labels["status"]): int(x.value) for f in families for x in f.samples
                    if x.name == "minidiff_requests_total"})


def check_metrics(s: Served, greedy: dict) -> list:
    expected = Counter(s.tally)  # the scrape below is counted after its own reply
    served = requests_counted(s)
    wrong = {k: (expected[k], served[k]) for k in expected.keys() | served.keys() if expected[k] != served[k]}
    return [("/metrics counts every request made (route, status)", not wrong, f"{sum(expected.values())} requests "
             f"in {len(expected)} (route, status) pairs; differ: {wrong or 'none'}", "equal")]


def check_sigterm(s: Served, greedy: dict) -> list:
    connection = http.client.HTTPConnection(s.host, s.port, timeout=120)
    body = {"model": s.model, "messages": [{"role": "user", "content": PROMPTS[4]}], "stream": True, **FOUR_BLOCKS}
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    reply = connection.getresponse()
    next(line for line in reply if line.startswith(b"data: {"))  # the first block's chunk
    s.process.send_signal(signal.SIGTERM)
    start = time.perf_counter()
    rest = reply.read().decode()
    s.process.wait(timeout=90)
    exited, done = time.perf_counter() - start, rest.rstrip().endswith("data: [DONE]")
    finished = '"finish_reason": "length"' in rest or '"finish_reason": "stop"' in rest
    return [("SIGTERM during a stream: it ends with [DONE], the process exits", done and finished and exited <= 60,
             f"[DONE]: {done}, finished: {finished}; exit status {s.process.returncode} after {exited:.1f} s",
             "[DONE], <= 60 s")]


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"--model {model_dir} has no tokenizer.json; give a model directory (tokenizer.json, "
                        "config.json, model.safetensors).")
    tokens = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    print(banner(), flush=True)
    ceiling = batching_ceiling(args)
    server, rows = Served(model_dir, "--max-tokens-limit", "448", "--batch-size", "4", "--dtype", args.dtype,
                          key=KEY, threads=args.threads), []
    try:
        server.chat(PROMPTS[0])  # warm up
        batching, greedy = check_batching(server, tokens, ceiling)  # the answers alone, which later checks compare with
        for check in (check_keys_and_fields, check_choices_and_suffix, check_limits_and_bad_input,
                      lambda _, __: batching, check_turns, check_metrics, check_sigterm):
            try:
                results = check(server, greedy)
            except Exception as error:  # a reply not as expected: that check fails, the others still run
                results = [(check.__name__, False, repr(error)[:300], "no error")]
            for name, ok, measured, limit in results:
                rows.append({"check": name, "pass": bool(ok), "measured": measured, "limit": limit})
                print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured} (limit: {limit})", flush=True)
    finally:
        server.close()
    failed = sum(not r["pass"] for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} checks passed; load average after: {os.getloadavg()}")
    write_results(args.json, {"settings": vars(args), "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
