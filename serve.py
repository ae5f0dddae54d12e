"""Serve a minidiff / Diffutron model behind an OpenAI-compatible API, streaming committed blocks.

    python serve.py --model DIR                         # then open http://127.0.0.1:8000/
    python serve.py --model DIR --preset diffutron-long --port 8080 --device cuda
    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "NAME", "messages": [{"role": "user", "content": "Merhaba"}], "stream": true}'

NAME is the model directory's name (GET /v1/models; --served-model-name). The sampler flags
(sample.py's) are every request's defaults; the request's fields override them. Requests that
arrive together are denoised in one batch, joining and leaving at block boundaries; at
temperature 0 an answer is the same alone or in any batch, bit for bit (--length-bucket), and
sample.py's for the same prompt and settings. GET / is a page
that shows the denoising live; GET /health, /ready and /metrics are for operators. Needs the
serve extra (pip install -e ".[serve]"). Reader's page: docs/serving.md.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from minidiff.errors import UserError, run_cli
from minidiff.model import model_device
from minidiff.plumbing import flags
from minidiff.plumbing.device import add_precision_flags
from minidiff.plumbing.sampling_cli import (
    add_sampler_flags,
    load_for_sampling,
    sampler_config,
)

try:
    import uvicorn

    from minidiff.serving.api import Limits
    from minidiff.serving.app import Service, make_app
    from minidiff.serving.engine import Engine, model_thread
    from minidiff.serving.ops import Metrics
except ImportError as missing:  # the serve extra is optional
    uvicorn = None
    MISSING = missing


def parse_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json) or hub id")
    p.add_argument("--served-model-name", help="the model id clients name (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one; the URL printed says which)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=16, help="rows denoised together at most (the memory of a "
                   "step grows with it)")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting for a row at most; past it: 429")
    p.add_argument("--gather-ms", type=float, default=10.0, help="an idle server woken by a request waits until "
                   "none has arrived for this long (at most 10 times): requests sent together start in one batch")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="canvas positions of the rows in the "
                   "batch at most (default: --batch-size times the context)")
    p.add_argument("--batch-by-length", dest="length_bucket", action="store_const", const=1,
                   help="--length-bucket 1: only rows of one canvas length share a step (no padding)")
    p.add_argument("--api-key", default=os.environ.get("MINIDIFF_API_KEY"), help="every /v1 route (and the page's) "
                   "needs Authorization: Bearer KEY (default: $MINIDIFF_API_KEY; none: open)")
    p.add_argument("--allowed-hosts", nargs="+", help="Host header names a request may carry (default: localhost, "
                   "127.0.0.1 and ::1 when --host is one of them, which keeps web pages from calling a local server "
                   "through a rebound name; else any; '*': any)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="max_tokens and steps a request may ask "
                   "for at most (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request bodies at most; past it: 413")
    p.add_argument("--allow-trace", action="store_true", help="let /v1 requests ask for trace (every step's "
                   "canvas; the page's own route always may)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take; past it: "
                   "504 (or an error event in a stream)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests "
                   "get to finish before the server exits")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the access log (one line per request) is info; probes of /health, /ready, /metrics debug")
    add_sampler_flags(p)
    add_precision_flags(p)
    return p.parse_args(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (a busy port is one sentence at once)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host} port {port} ({error.strerror}); choose another --port "
                        "(0: any free one) or --host.") from None
    return sock


async def serve(app, sock: socket.socket, service, shutdown_timeout: float) -> None:
    """Run uvicorn on the socket; print the URL once it listens. SIGTERM: /ready says 503, the
    socket closes, in-flight requests get `shutdown_timeout` seconds, then the process exits."""
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.draining = True
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                   timeout_graceful_shutdown=shutdown_timeout))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"minidiff serving on http://{shown}:{port}/", flush=True)
    await task


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def allowed_hosts(args) -> tuple[str, ...] | None:
    """--allowed-hosts, lower case; by default the loopback names for a loopback --host, else any (None)."""
    if args.allowed_hosts:
        return None if "*" in args.allowed_hosts else tuple(h.lower() for h in args.allowed_hosts)
    return LOOPBACK if args.host.lower() in LOOPBACK else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if uvicorn is None:
        raise UserError(f"serve.py needs the serve extra ({MISSING}); install it with pip install -e \".[serve]\".")
    for name in ("batch_size", "queue_size", "max_batch_tokens", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}.")
    for name, value, top in (("gather-ms", args.gather_ms, 10_000), ("request-timeout", args.request_timeout, 1e6),
                             ("shutdown-timeout", args.shutdown_timeout, 1e6)):
        if not 0 <= value <= top:
            raise UserError(f"--{name} must be between 0 and {top:g}, got {value}.")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    config = sampler_config(args)
    sock = listening_socket(args.host, args.port)
    thread = model_thread()  # loads the model and runs it: one thread starts its OpenMP work
    model, tok, precision = thread.submit(load_for_sampling, args).result()
    context = model.config.max_position_embeddings
    metrics = Metrics()
    engine = Engine(model, tok.mask_id, tok.eos_id, precision, args.batch_size, args.queue_size,
                    args.gather_ms / 1000, args.max_batch_tokens or args.batch_size * context, metrics,
                    config.length_bucket, thread)
    limits = Limits(context, min(args.max_tokens_limit or context, context), args.queue_size, args.allow_trace)
    service = Service(args.served_model_name or Path(args.model.rstrip("/")).name, tok, config, limits, engine,
                      model_device(model), metrics, args.api_key or None, allowed_hosts(args), args.max_body_bytes,
                      args.request_timeout)
    asyncio.run(serve(make_app(service), sock, service, args.shutdown_timeout))
    return 0


if __name__ == "__main__":
    run_cli(main)
