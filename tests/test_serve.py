"""serve.py end to end on a tiny model: live servers on 127.0.0.1, answers against sample.py's.

The reference is sample.py itself (--batch-size 1: each prompt alone, speed.sampling.generate);
the server must give the same answer plain, streamed, alone or among 16 concurrent requests.
Every request goes to a server these tests started on the loopback address; each test bounds
its requests in count and time. The page is checked in a real headless Chromium where Debian's
chromium and chromium-driver are installed (skipped with the reason otherwise).
"""
from __future__ import annotations

import functools
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import TURKISH_TEXT, make_model_dir

pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the dev extra's openai client is not installed")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the server's defaults and sample.py's flags: 3 blocks of 16, 8 steps each; the penalty makes
# the tiny random model's answers depend on the prompt (without it every prompt gets one answer)
SETTINGS = ["--max-new-tokens", "48", "--steps", "24", "--block-length", "16", "--repetition-penalty", "1.3"]
PROMPTS = TURKISH_TEXT + [f"{i + 1}. soru: {text}" for i, text in enumerate(TURKISH_TEXT[:4])]  # 16
MODEL = "model"  # the model directory's name: the served model id


class Tokenized:
    """The server's tokenizer for counting: encode(text) without special tokens."""

    def __init__(self, model_dir: Path):
        import minidiff
        self.tok = minidiff.load_tokenizer(str(model_dir))
        self.bos_id, self.mask_id, self.eos_id = self.tok.bos_id, self.tok.mask_id, self.tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class Server:
    """serve.py in a subprocess on 127.0.0.1 (a free port), stopped by `close`."""

    def __init__(self, model_dir: Path, *flags: str, harness: str | None = None):
        """`harness`: Python that runs serve.main(sys.argv[1:]) after changing something in the server."""
        self.log = open(model_dir.parent / f"server-{time.monotonic_ns()}.log", "w+")
        program = ["-c", harness] if harness else [str(ROOT / "serve.py")]
        self.process = subprocess.Popen(
            [sys.executable, *program, "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", "0", "--device", "cpu", *SETTINGS, *flags],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT, env=ENV)
        lines = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            line = ""
        if "http://" not in line:
            self.close()
            self.log.seek(0)
            raise RuntimeError(f"serve.py did not start: {line!r} {self.log.read()}")
        self.url = line.split()[-1]
        self.tokenizer = Tokenized(model_dir)
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port

    def connect(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, raw: bytes | None = None):
        """(status, headers, JSON body) of one request."""
        connection = self.connect()
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        payload = reply.read()
        connection.close()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, json.loads(payload)

    def health(self) -> dict:
        return self.request("GET", "/health")[2]

    def client(self):
        return openai.OpenAI(base_url=self.url + "v1", api_key="unused", max_retries=0, timeout=120)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


def sample_results(model_dir: Path, prompts: list[str], *flags: str) -> list[dict]:
    """sample.py's results ({"text", "ids"}), each prompt alone (--batch-size 1)."""
    args = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    res = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model_dir), "--device", "cpu",
                          "--batch-size", "1", "--json", *SETTINGS, *flags, *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["results"]


def sample_answers(model_dir: Path, prompts: list[str], *flags: str) -> list[str]:
    return [r["text"] for r in sample_results(model_dir, prompts, *flags)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / MODEL, seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    running = Server(model_dir, "--batch-size", "16", "--queue-size", "64")
    yield running
    running.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    return dict(zip(PROMPTS, sample_answers(model_dir, PROMPTS)))


def stream_chat(client, prompt: str, **options) -> tuple[list[str], str]:
    """(the content of every chunk, the finish reason) of one streamed chat completion."""
    pieces, finish = [], None
    for part in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               stream=True, **options):
        if part.choices:
            pieces.append(part.choices[0].delta.content or "")
            finish = part.choices[0].finish_reason or finish
    return pieces, finish


# ----------------------------------------------------------------------------- the API


@pytest.mark.slow  # a server and sample.py start-up
def test_plain_equals_streamed_equals_sample_py(server, reference):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    for prompt in PROMPTS[:3]:
        plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
        pieces, finish = stream_chat(client, prompt)
        assert plain.choices[0].message.content == "".join(pieces) == reference[prompt]
        assert finish == plain.choices[0].finish_reason
        if finish == "length":  # 48 tokens in blocks of 16: one chunk per block
            assert len(pieces) == 3
        usage = plain.usage
        assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow  # a server and sample.py start-up
def test_raw_completions_and_stop_strings_equal_sample_py(server, model_dir):
    """/v1/completions is sample.py --raw; `stop` is --stop-strings, streamed text held back
    until no stop string can still cut it (the streamed chunks add up to the plain answer)."""
    client = server.client()
    prompts, stop = PROMPTS[4:7], ["ç", "ti"]
    raw = sample_answers(model_dir, prompts, "--raw")
    stopped = sample_answers(model_dir, prompts, "--stop-strings", *stop)
    for prompt, want_raw, want_stopped in zip(prompts, raw, stopped):
        text = client.completions.create(model=MODEL, prompt=prompt)
        assert text.choices[0].text == want_raw and text.object == "text_completion"
        streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, stream=True)
                           if c.choices)
        assert streamed == want_raw
        plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], stop=stop)
        pieces, finish = stream_chat(client, prompt, stop=stop)
        assert plain.choices[0].message.content == "".join(pieces) == want_stopped
        assert finish == plain.choices[0].finish_reason == "stop"  # the stop strings do come up


@pytest.mark.slow  # a server and sample.py start-up
def test_a_seeded_sample_is_sample_py_s_among_other_requests(server, model_dir):
    """temperature > 0 with a seed: the row keeps its own generators (it runs alone), so its
    draws are sample.py's, whatever else the server is doing at the time."""
    prompt, options = PROMPTS[8], {"temperature": 0.8, "seed": 5}
    want = sample_answers(model_dir, [prompt], "--temperature", "0.8", "--seed", "5")[0]
    client = server.client()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(client.completions.create, model=MODEL, prompt=p) for p in PROMPTS[:3]]
        seeded = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **options)
        assert all(o.result().choices for o in others)
    assert seeded.choices[0].message.content == want


@pytest.mark.slow  # a server and sample.py start-up
def test_sixteen_concurrent_requests_each_equal_alone(server, reference):
    client = server.client()
    before = server.health()["blocks"]

    def ask(prompt: str) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [reference[p] for p in PROMPTS]
    assert len(set(answers)) > 1  # the prompts lead to different answers: a row mix-up would show
    # 16 requests x 3 blocks alone would be 48 blocks; in batches far fewer
    assert server.health()["blocks"] - before <= 24


BAD = [  # (method, path, body or raw bytes, status, param)
    ("POST", "/v1/chat/completions", b'{"model": "model", "messages": [', 400, None),
    ("POST", "/v1/chat/completions", b'["model"]', 400, None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("POST", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "x"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0]"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0]"),
    ("POST", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "steps": 0}, 400, "steps"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "cache": "all"}, 400, "cache"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [], "n": 1}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": ["x", 3]}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": "s" * 65}, 400, "stop"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "trace": True}, 400, "trace"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y", "stop": "z"}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "suffix": "y"}, 400, "suffix"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 513}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Ankara " * 600}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("GET", "/v1/nothing", None, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
]


@pytest.mark.slow  # a server start-up
@pytest.mark.parametrize("method, path, body, status, param", BAD)
def test_bad_input_is_an_openai_error_and_the_next_request_works(server, method, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, _, reply = server.request(method, path, None if raw else body, raw)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"] and error["type"] == "invalid_request_error"
    ok, _, answer = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4})
    assert ok == 200 and answer["usage"]["completion_tokens"] <= 4


@pytest.mark.slow  # two python + torch start-ups
def test_bad_flags_and_a_busy_port_are_one_sentence(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for flags, words in [(["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
                             (["--port", "0", "--batch-size", "0"], "--batch-size must be")]:
            res = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), *flags],
                                 capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
            assert res.returncode == 2 and res.stdout == ""
            assert res.stderr.startswith(f"error: {words}") and len(res.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- leaving and the queue


@pytest.fixture(scope="module")
def one_row_server(model_dir):
    running = Server(model_dir, "--batch-size", "1", "--queue-size", "1")
    yield running
    running.close()


def open_stream(server: Server, max_tokens: int):
    """A streamed completion read up to its first chunk: (connection, response)."""
    connection = server.connect()
    body = {"model": MODEL, "prompt": "Ankara", "max_tokens": max_tokens, "stream": True}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200
    assert reply.readline().startswith(b"data: {")
    return connection, reply


@pytest.mark.slow  # a server start-up
def test_an_abandoned_stream_frees_its_row(one_row_server):
    server = one_row_server
    before = server.health()["blocks"]
    connection, reply = open_stream(server, 16 * 30)  # 30 blocks if it were read to the end
    reply.close()  # the client leaves after the first block
    connection.close()
    status, _, _ = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "İzmir"})
    assert status == 200
    # one row at a time: the next request ran once the abandoned row had left, not 29 blocks later
    assert server.health()["blocks"] - before < 15


@pytest.mark.slow  # a server start-up
def test_past_the_queue_bound_429_with_retry_after(one_row_server):
    server = one_row_server
    connection, reply = open_stream(server, 16 * 30)  # the one row
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.request, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 16})
        deadline = time.monotonic() + 60
        while server.health()["waiting"] < 1:  # the queue's one place taken
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, headers, busy = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "y"})
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert busy["error"]["code"] == "queue_full" and busy["error"]["type"] == "rate_limit_error"
        reply.close()  # the row frees, the waiting request runs: accepted requests are not dropped
        connection.close()
        assert waiting.result(timeout=120)[0] == 200


# ----------------------------------------------------------------------------- the page


def headless_chromium():
    """A selenium driver of Debian's headless Chromium that reaches nothing but the loopback."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no headless Chromium here: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra's selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--proxy-server=127.0.0.1:9",  # anything not on the loopback fails here
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


@pytest.mark.slow  # a server and a browser start-up
def test_the_page_shows_masks_becoming_the_answer(server, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    prompt = PROMPTS[1]
    browser = headless_chromium()
    try:
        browser.get(server.url)
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "status").text in ("done", "error"))
        assert browser.find_element(By.ID, "status").text == "done"
        assert browser.find_element(By.ID, "answer").get_attribute("textContent") == reference[prompt]
        frames = int(browser.find_element(By.ID, "total").text)
        assert frames == 3 * 8 + 1  # every step of the 3 blocks of 8 steps, then the answer after the stop rules

        def cells_at(step: int, kind: str) -> int:
            browser.execute_script(f"const s = document.getElementById('slider'); s.value = {step}; s.oninput();")
            return len(browser.find_elements(By.CSS_SELECTOR, f"#canvas .{kind}"))

        assert cells_at(0, "mask") == 48  # the canvas before the first step: all masks
        assert 0 < cells_at(1, "mask") < 48 and cells_at(1, "mask") > cells_at(9, "mask")  # step by step
        assert cells_at(1, "new") == 48 - cells_at(1, "mask")  # what step 1 committed, marked
        assert cells_at(1, "block") + cells_at(1, "new") == 16  # the first block, framed
        assert cells_at(frames, "mask") == 0
    finally:
        browser.quit()


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.slow  # a model, a server and 3 requests
def test_bench_serve_runs_and_answers_equal_generate(tmp_path):
    """benchmarks/bench_serve.py end to end on its small model, reduced: the server's answers to
    concurrent clients equal its answers alone (timings are not asserted: docs/benchmarks.md has
    them; generate's alone may differ by rounding: its confidences tie exactly)."""
    out = tmp_path / "serve.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--clients", "1", "2",
                          "--max-tokens", "8", "--steps", "4", "--block-length", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    assert [r["served_equal_served_alone"] for r in rows] == [1, 2]
    assert all(r["tokens"] > 0 and r["first_block_median_s"] <= r["total_median_s"] for r in rows)
    assert "| clients |" in res.stdout


# ----------------------------------------------------------------------------- every field honoured or refused

REFUSED = [  # (field, a value that would change the answer)
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}), ("logprobs", True), ("top_logprobs", 2),
    ("logit_bias", {"5": 10}), ("echo", True), ("best_of", 2), ("frequency_penalty", 0.5),
    ("presence_penalty", -1), ("functions", [{"name": "f"}]),
]
INERT = {"seed": None, "temperature": None, "max_tokens": None, "top_p": 1, "frequency_penalty": 0,
         "presence_penalty": 0.0, "n": 1, "logprobs": False, "logit_bias": {}, "echo": False, "best_of": 1,
         "user": "someone", "response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "stop": None}


@pytest.mark.slow  # a server start-up
@pytest.mark.parametrize("field, value", REFUSED)
def test_a_field_that_would_change_the_answer_is_refused_by_name(server, field, value):
    body = {"model": MODEL, "prompt": "x", field: value}
    status, _, reply = server.request("POST", "/v1/completions", body)
    assert status == 400 and reply["error"]["param"] == field and field in reply["error"]["message"]


@pytest.mark.slow  # a server and sample.py start-up
def test_nulls_and_values_that_change_nothing_are_accepted(server, reference):
    prompt = PROMPTS[0]
    status, _, reply = server.request("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": prompt}], **INERT})
    assert status == 200 and reply["choices"][0]["message"]["content"] == reference[prompt]
    status, _, reply = server.request("POST", "/v1/completions", {
        "model": MODEL, "prompt": prompt, "max_completion_tokens": 16, "suffix": None, "echo": None})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 16


@pytest.mark.slow  # a server and sample.py start-up
def test_top_k_1_and_a_tiny_top_p_give_the_greedy_answer_at_temperature_1(server, reference):
    client, prompt = server.client(), PROMPTS[2]
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               temperature=1, seed=7, extra_body=extra)
        assert reply.choices[0].message.content == reference[prompt], extra
    status, _, reply = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0})
    assert status == 400 and reply["error"]["param"] == "top_p"


@pytest.fixture(scope="module")
def raw_reference(model_dir):
    prompts = PROMPTS[4:7]
    return dict(zip(prompts, sample_answers(model_dir, prompts, "--raw")))


@pytest.mark.slow  # a server and sample.py start-up
def test_n_and_a_list_of_prompts_give_choices_equal_to_alone(server, raw_reference):
    prompts = list(raw_reference)[:2]
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=prompts, n=3)
    want = [raw_reference[p] for p in prompts for _ in range(3)]
    assert [c.index for c in plain.choices] == list(range(6))
    assert [c.text for c in plain.choices] == want
    streamed = [""] * 6
    for part in client.completions.create(model=MODEL, prompt=prompts, n=3, stream=True):
        for c in part.choices:
            streamed[c.index] += c.text
    assert streamed == want
    assert plain.usage.prompt_tokens == sum(len(server.tokenizer.encode(p)) + 1 for p in prompts)  # + <bos>


@pytest.mark.slow  # a server and sample.py start-up
def test_usage_counts_the_tokens_of_the_text_returned(server, model_dir):
    """completion_tokens: the shortest run of the answer's ids (sample.py's) whose text holds the
    text returned, so neither the end of turn nor eos and padding."""
    client, tok = server.client(), server.tokenizer
    for result, prompt in zip(sample_results(model_dir, PROMPTS[9:12]), PROMPTS[9:12]):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
        text = reply.choices[0].message.content
        assert text == result["text"]
        k = next(k for k in range(len(result["ids"]) + 1) if text in tok.decode(result["ids"][:k]))
        assert reply.usage.completion_tokens == k


@pytest.mark.slow  # a server and sample.py start-up
def test_suffix_fills_the_middle_as_sample_py_infills(server, model_dir):
    """prompt | max_tokens masks | suffix, one block of 16 steps: the server's fill equals
    sample.py --infill's (the fast loop's infill, the whole canvas one block) on the same canvas."""
    tok, client, prompt, fills = server.tokenizer, server.client(), "Ankara", []
    for suffix in (" güzel bir şehirdir.", " ve İzmir Türkiye'nin kentleridir."):
        options = dict(model=MODEL, prompt=prompt, suffix=suffix, max_tokens=16, temperature=0,
                       extra_body={"block_length": 16, "steps": 16})
        got = [client.completions.create(**options).choices[0].text for _ in range(2)]
        assert got[0] == got[1]  # deterministic at temperature 0
        res = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model_dir), "--device", "cpu",
                              "--json", *SETTINGS, "--steps", "16", "--block-length", "512",
                              "--infill", prompt + "<mask>" * 16 + suffix],
                             capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
        assert res.returncode == 0, res.stderr
        start = 1 + len(tok.encode(prompt))
        assert got[0] == tok.decode(json.loads(res.stdout)["ids"][start:start + 16])
        fills.append(got[0])
    assert fills[0] != fills[1]  # the fill depends on the suffix


# ----------------------------------------------------------------------------- keys, limits, metrics

KEY = "test-key-123"


@pytest.fixture(scope="module")
def guarded_server(model_dir):
    running = Server(model_dir, "--api-key", KEY, "--max-tokens-limit", "64", "--batch-size", "4", "--batch-by-length")
    yield running
    running.close()


def raw_request(server: Server, path: str, data: bytes, headers: dict) -> tuple[int, dict]:
    connection = server.connect()
    connection.request("POST", path, body=data, headers=headers)
    reply = connection.getresponse()
    status, payload = reply.status, reply.read()
    connection.close()
    return status, json.loads(payload)


@pytest.mark.slow  # a server start-up
def test_keys_and_limits(guarded_server):
    server, body = guarded_server, {"model": MODEL, "prompt": "x", "max_tokens": 8}
    data, json_type = json.dumps(body).encode(), {"Content-Type": "application/json"}
    for headers in (json_type, {**json_type, "Authorization": "Bearer wrong"}):
        status, reply = raw_request(server, "/v1/completions", data, headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/health")[0] == 200  # open
    with pytest.raises(openai.AuthenticationError):
        server.client().completions.create(**body)
    client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)
    assert client.completions.create(**body).choices[0].text is not None
    auth = {**json_type, "Authorization": f"Bearer {KEY}"}
    # a web page's name rebound to 127.0.0.1: refused (a loopback --host answers to loopback names only)
    status, reply = raw_request(server, "/v1/completions", data, {**auth, "Host": "pages.example:80"})
    assert status == 400 and reply["error"]["code"] == "invalid_host"
    assert raw_request(server, "/v1/completions", data, {**auth, "Host": f"localhost:{server.port}"})[0] == 200
    assert raw_request(server, "/v1/completions", data, {**auth, "Content-Type": "text/plain"})[0] == 415
    assert raw_request(server, "/v1/completions", b"{" + b" " * (2 << 20) + b"}", auth)[0] == 413
    for name, value in (("max_tokens", 65), ("steps", 65)):
        status, reply = raw_request(server, "/v1/completions", json.dumps({**body, name: value}).encode(), auth)
        assert status == 400 and reply["error"]["param"] == name
    with pytest.raises(openai.BadRequestError):  # the page's route: the key too
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"trace": True})


@pytest.mark.parametrize("host, name", [(b"127.0.0.1:8000", "127.0.0.1"), (b"[::1]:8000", "::1"),
                                        (b"LocalHost", "localhost"), (b"pages.example:80", "pages.example"), (b"", "")])
def test_the_host_header_is_read_without_its_port(host, name):
    from minidiff.serving.ops import host_name

    assert host_name({"headers": [(b"host", host)]}) == name


@pytest.mark.slow  # a server start-up
def test_the_page_route_may_trace_and_metrics_count_every_request(guarded_server):
    from prometheus_client.parser import text_string_to_metric_families

    server = guarded_server

    def scrape() -> dict:
        connection = server.connect()
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 16, "stream": True,
            "trace": True}
    connection = server.connect()
    connection.request("POST", "/page/chat", body=json.dumps(body), headers=auth)
    events = connection.getresponse().read().decode()
    connection.close()
    assert events.count("event: step") > 1 and events.rstrip().endswith("data: [DONE]")
    statuses = [raw_request(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": m})
                            .encode(), auth)[0] for m in (8, 8, 99)]
    after = scrape()

    def grew(route: str, status: int) -> float:
        key = ("minidiff_requests_total", (("route", route), ("status", str(status))))
        return after.get(key, 0) - before.get(key, 0)

    assert statuses == [200, 200, 400]
    assert grew("/v1/completions", 200) == 2 and grew("/v1/completions", 400) == 1
    assert grew("/page/chat", 200) == 1 and grew("/metrics", 200) == 1  # the first scrape
    assert after[("minidiff_completion_tokens_total", ())] > before[("minidiff_completion_tokens_total", ())]
    assert after[("minidiff_time_to_first_block_seconds_count", ())] - \
        before[("minidiff_time_to_first_block_seconds_count", ())] == 3
    assert ("minidiff_queue_depth", ()) in after and ("minidiff_batch_rows", ()) in after


# ----------------------------------------------------------------------------- turns, failures, shutdown


@pytest.mark.slow  # a server start-up
def test_a_short_request_beside_a_long_block_waits_steps_not_the_block(server):
    """One block of 448 positions in 448 steps; a 16-token request of another shape sent beside it
    finishes long before that block ends (the groups take turns step by step)."""
    long = {"model": MODEL, "prompt": "Ankara", "max_tokens": 448, "steps": 448, "block_length": 448}
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        running = pool.submit(lambda: (server.request("POST", "/v1/completions", long), time.monotonic()))
        while server.health()["active"] == 0:
            time.sleep(0.01)
        time.sleep(0.2)  # the long block is under way
        sent = time.monotonic()
        short = {"model": MODEL, "prompt": "İzmir", "max_tokens": 16, "steps": 4, "block_length": 16}
        assert server.request("POST", "/v1/completions", short)[0] == 200
        short_done = time.monotonic()
        (status, _, reply), long_done = running.result(timeout=300)
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    assert short_done - sent < 0.5 * (long_done - started), (short_done - sent, long_done - started)


@pytest.mark.slow  # a server start-up
def test_batch_by_length_shares_steps_only_between_equal_canvases(guarded_server):
    """--batch-by-length: two requests of different prompt lengths sent at once never share a
    block (as many blocks as both alone), two of the same prompt do (fewer)."""
    server = guarded_server
    client = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)

    def blocks_for(prompts: list[str]) -> int:
        before = server.health()["blocks"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(lambda p: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=32), prompts))
        assert all(r.choices[0].message.content for r in replies)
        return server.health()["blocks"] - before

    short, long = PROMPTS[0], PROMPTS[0] + " " + PROMPTS[1]
    alone = [blocks_for([p]) for p in (short, long)]
    assert blocks_for([short, long]) == sum(alone) and blocks_for([long, long]) < 2 * alone[1]


def test_admission_takes_the_oldest_then_the_rows_of_its_group(tmp_path):
    """--batch-size 3, waiting rows A1 B1 A2 A3 B2 (A and B two canvas buckets): the oldest (A1),
    then its group (A2, A3); once room frees, B1 (now the oldest) with B2. A token budget that holds
    two A's admits A1 and A2, then B1 alone (the oldest always fits an empty batch)."""
    import torch

    import minidiff
    from minidiff.data.chat import StopRules
    from minidiff.plumbing.device import Precision
    from minidiff.serving.batch import Row
    from minidiff.serving.engine import Engine
    from minidiff.speed.sampling import FastConfig

    directory = make_model_dir(tmp_path / "m", seed=0)
    model, tok = minidiff.load_model(str(directory), device="cpu"), minidiff.load_tokenizer(str(directory))
    config = FastConfig(max_new_tokens=8, steps=8, block_length=8)
    stops = StopRules.make(config, tok, tok.pad_id, tok.eos_id)
    lengths = {"A": 4, "B": 30}  # canvases of 12 and 38 positions: buckets 16 and 48
    order = ["A1", "B1", "A2", "A3", "B2"]
    for budget, first, then in ((None, ["A1", "A2", "A3"], ["B1", "B2"]), (2 * 16, ["A1", "A2"], ["B1"])):
        engine = Engine(model, tok.mask_id, tok.eos_id, Precision(torch.device("cpu"), torch.float32, None), 3, 8,
                        token_budget=budget, bucket=16)
        tickets = engine.submit([Row.start([7] * lengths[n[0]], config, stops, tok.mask_id, "cpu") for n in order])
        name = {id(t): n for t, n in zip(tickets, order)}
        engine.admit()
        assert [name[id(t)] for t in engine.active] == first
        engine.active.clear()  # their answers are over
        engine.admit()
        assert [name[id(t)] for t in engine.active] == then  # B1 the oldest now; alone over the budget
        engine.close()


def engine_answers(model, tok, prompts: list[list[int]], config, bucket: int, together: bool) -> list[list[int]]:
    """Each prompt's answer through an in-process Engine: all submitted at once, or one after another."""
    import asyncio

    import torch

    from minidiff.data.chat import StopRules
    from minidiff.plumbing.device import Precision
    from minidiff.serving.batch import Row
    from minidiff.serving.engine import Engine

    stops = StopRules.make(config, tok, tok.pad_id, tok.eos_id)

    async def run() -> list[list[int]]:
        precision = Precision(torch.device("cpu"), torch.float32, None)
        engine = Engine(model, tok.mask_id, tok.eos_id, precision, len(prompts), len(prompts), bucket=bucket)
        worker = asyncio.create_task(engine.run())

        async def answer(prompt: list[int]) -> list[int]:
            ticket = engine.submit([Row.start(prompt, config, stops, tok.mask_id, "cpu")])[0]
            while not (event := (await asyncio.wait_for(ticket.events.get(), 120))[1]).finished:
                pass
            return event.answer

        answers = await asyncio.gather(*map(answer, prompts)) if together else [await answer(p) for p in prompts]
        worker.cancel()
        engine.close()
        return list(answers)

    return asyncio.run(run())


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("options", [{}, {"cache": "prefix"}, {"cache": "dual"}, {"threshold": 0.5},
                                     {"cache": "prefix", "threshold": 0.5}, {"cache": "dual", "threshold": 0.5}],
                         ids=["none", "prefix", "dual", "threshold", "prefix-threshold", "dual-threshold"])
def test_sixteen_prompts_at_once_each_equal_alone_bit_for_bit(tmp_path, options, packed):
    """16 prompts of 16 lengths sent at once: every answer equals its prompt sent alone, under
    length buckets. The model's sharpened head makes threshold decoding meet near-ties: padded
    to the batch's longest instead (bucket 0), 2 of the 16 threshold answers differ on this CPU."""
    import torch

    import minidiff
    from minidiff.speed.packed import pack_weights, unpack_weights
    from minidiff.speed.sampling import FastConfig, generate

    directory = make_model_dir(tmp_path / "m", seed=0)
    model, tok = minidiff.load_model(str(directory), device="cpu"), minidiff.load_tokenizer(str(directory))
    with torch.no_grad():
        model.head.norm.weight.mul_(4.0)  # confident predictions: confidences near the threshold
    (pack_weights if packed else unpack_weights)(model)
    prompts = [tok.encode(p)[:3 + 5 * i] for i, p in enumerate(PROMPTS)]
    assert len({len(p) for p in prompts}) > 8  # many lengths: alone, most rows would be padded
    config = FastConfig(max_new_tokens=24, steps=12, block_length=8, repetition_penalty=1.3, **options)
    alone = engine_answers(model, tok, prompts, config, 16, together=False)
    assert engine_answers(model, tok, prompts, config, 16, together=True) == alone
    assert len({tuple(a) for a in alone}) > 2  # the prompts lead to different answers: a mix-up would show
    # sample.py's: generate's one batch and each prompt alone give the served answers, bit for bit
    ask = functools.partial(generate, model, config=config, mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok,
                            pad_id=tok.pad_id)
    assert ask(prompts).answers() == alone
    assert [ask([p]).answers()[0] for p in prompts] == alone


def test_a_model_failure_ends_its_block_only_and_is_logged(tmp_path, caplog):
    """In-process engine: a row the model cannot take (a token id past the vocabulary) fails its
    block; a row of another shape beside it runs on and equals generate alone."""
    import asyncio

    import torch

    import minidiff
    from minidiff.data.chat import StopRules
    from minidiff.plumbing.device import Precision
    from minidiff.speed.sampling import FastConfig
    from minidiff.serving.batch import Row
    from minidiff.serving.engine import Committed, Engine, Failed
    from minidiff.speed.sampling import generate

    directory = make_model_dir(tmp_path / "m", seed=0)
    model, tok = minidiff.load_model(str(directory), device="cpu"), minidiff.load_tokenizer(str(directory))
    good, bad = FastConfig(max_new_tokens=8, steps=8, block_length=8), FastConfig(max_new_tokens=4, steps=4,
                                                                                  block_length=4)
    prompt = tok.encode("Ankara")
    stops = StopRules.make(good, tok, tok.pad_id, tok.eos_id)

    async def run() -> tuple:
        precision = Precision(torch.device("cpu"), torch.float32, None)
        engine = Engine(model, tok.mask_id, tok.eos_id, precision, 4, 4)
        worker = asyncio.create_task(engine.run())
        failing = engine.submit([Row.start([model.config.vocab_size + 5], bad, stops, tok.mask_id, "cpu")], "req-bad")
        fine = engine.submit([Row.start(prompt, good, stops, tok.mask_id, "cpu")], "req-good")
        results = [await asyncio.wait_for(t[0].events.get(), 120) for t in (failing, fine)]
        worker.cancel()
        engine.close()
        return results

    with caplog.at_level("ERROR", logger="minidiff.serve"):
        (_, failed), (_, done) = asyncio.run(run())
    assert isinstance(failed, Failed) and isinstance(done, Committed) and done.finished
    alone = generate(model, [prompt], good, mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok, pad_id=tok.pad_id)
    assert done.answer == alone.answers()[0]
    assert "req-bad" in caplog.text and "req-good" not in caplog.text


@pytest.mark.slow  # a server start-up
def test_a_plain_request_whose_client_leaves_frees_its_row(one_row_server):
    server = one_row_server
    before = server.health()["blocks"]
    connection = server.connect()
    body = {"model": MODEL, "prompt": "Ankara", "max_tokens": 16 * 30, "steps": 16 * 30}  # 30 blocks of 16 steps
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while server.health()["blocks"] == before:  # it runs
        assert time.monotonic() < deadline
        time.sleep(0.02)
    connection.close()  # gone before its answer
    assert server.request("POST", "/v1/completions", {"model": MODEL, "prompt": "İzmir"})[0] == 200
    assert server.health()["blocks"] - before < 20


@pytest.mark.slow  # a server start-up
def test_the_deadline_then_sigterm_lets_a_stream_finish_and_the_server_exits(model_dir):
    running = Server(model_dir, "--shutdown-timeout", "60", "--request-timeout", "2")
    try:
        started = time.monotonic()
        slow = {"model": MODEL, "prompt": "Ankara", "max_tokens": 448, "steps": 448, "block_length": 448}
        status, _, reply = running.request("POST", "/v1/completions", slow)
        assert status == 504 and reply["error"]["code"] == "timeout" and time.monotonic() - started < 30
        connection, reply = open_stream(running, 16 * 6)
        running.process.send_signal(signal.SIGTERM)
        rest = reply.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        connection.close()
        assert running.process.wait(timeout=60) is not None
        with pytest.raises(OSError):
            running.request("GET", "/health")
    finally:
        running.close()


# serve.py with a 0.3 s keep-alive, or with a worker that dies at its first turn
HARNESS = """
import sys
import serve
from minidiff.serving import app, engine
app.KEEPALIVE = 0.3
if {kill}:
    candidates = engine.Engine.candidates
    def broken(self):
        if self.active:
            raise RuntimeError("the worker's own bug")
        return candidates(self)
    engine.Engine.candidates = broken
sys.exit(serve.main(sys.argv[1:]))
"""


@pytest.mark.slow  # a server start-up
def test_a_stream_sends_keep_alive_comments_while_a_slow_block_runs(model_dir):
    running = Server(model_dir, harness=HARNESS.format(kill=False))
    try:
        connection = running.connect()
        slow = {"model": MODEL, "prompt": "Ankara", "max_tokens": 448, "steps": 448, "block_length": 448,
                "stream": True}
        connection.request("POST", "/v1/completions", json.dumps(slow), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        started, lines = time.monotonic(), []
        while not (lines and lines[-1].startswith(b"data: {")):  # up to the block's chunk
            lines.append(reply.readline())
        seconds = time.monotonic() - started
        comments = lines.count(b": keep-alive\n")
        assert seconds > 1.0 and comments >= 2, (seconds, lines[:5])  # one per 0.3 s of silence
        assert reply.read().rstrip().endswith(b"data: [DONE]")
        connection.close()
    finally:
        running.close()


@pytest.mark.slow  # a server start-up
def test_health_and_ready_say_503_when_the_worker_dies(model_dir):
    running = Server(model_dir, "--request-timeout", "3", harness=HARNESS.format(kill=True))
    try:
        assert running.request("GET", "/health")[0] == 200  # the worker sleeps until a request comes
        status, _, reply = running.request("POST", "/v1/completions", {"model": MODEL, "prompt": "Ankara"})
        assert status == 504 and reply["error"]["code"] == "timeout"  # its worker is gone: the deadline answers
        status, _, health = running.request("GET", "/health")
        assert status == 503 and health["status"] == "dead"
        assert running.request("GET", "/ready")[0] == 503
        running.log.seek(0)
        assert "the worker's own bug" in running.log.read()
    finally:
        running.close()
