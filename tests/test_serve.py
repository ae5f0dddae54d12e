"""serve.py end to end on a tiny model: live servers on 127.0.0.1, answers against sample.py's.

The reference is sample.py itself (--batch-size 1: each prompt alone, speed.sampling.generate);
the server must give the same answer plain, streamed, alone or among 16 concurrent requests.
Every request goes to a server these tests started on the loopback address; each test bounds
its requests in count and time. The page is checked in a real headless Chromium where Debian's
chromium and chromium-driver are installed (skipped with the reason otherwise).
"""
from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
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


class Server:
    """serve.py in a subprocess on 127.0.0.1 (a free port), stopped by `close`."""

    def __init__(self, model_dir: Path, *flags: str):
        self.log = open(model_dir.parent / f"server-{time.monotonic_ns()}.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--host", "127.0.0.1",
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


def sample_answers(model_dir: Path, prompts: list[str], *flags: str) -> list[str]:
    """sample.py's answers, each prompt alone (--batch-size 1)."""
    args = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    res = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model_dir), "--device", "cpu",
                          "--batch-size", "1", "--json", *SETTINGS, *flags, *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr
    return [r["text"] for r in json.loads(res.stdout)["results"]]


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
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
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
    """benchmarks/bench_serve.py end to end on its small model, reduced: the server's answers
    equal generate's one by one (timings are not asserted: docs/benchmarks.md has them)."""
    out = tmp_path / "serve.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--clients", "1", "2",
                          "--max-tokens", "8", "--steps", "4", "--block-length", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    assert [r["served_equal_alone"] for r in rows] == [r["batch_equal_alone"] for r in rows] == [1, 2]
    assert all(r["tokens"] > 0 and r["first_block_median_s"] <= r["total_median_s"] for r in rows)
    assert "| clients |" in res.stdout
