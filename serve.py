"""Serve a minidiff / Diffutron model behind an OpenAI-compatible API, streaming committed blocks.

    python serve.py --model DIR                         # then open http://127.0.0.1:8000/
    python serve.py --model DIR --preset diffutron-long --port 8080 --device cuda
    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "NAME", "messages": [{"role": "user", "content": "Merhaba"}], "stream": true}'

NAME is the model directory's name (GET /v1/models; --served-model-name). The sampler flags
(sample.py's) are every request's defaults; a request's max_tokens, temperature, stop, seed,
steps, block_length, cache, threshold and repetition_penalty override them. Requests that
arrive together are denoised in one batch, joining and leaving at block boundaries; at
temperature 0 each answer is sample.py's for the same prompt and settings. GET / is a page
that shows the denoising live. Needs the serve extra (pip install -e ".[serve]").
Reader's page: docs/serving.md.
"""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from minidiff.errors import UserError, run_cli
from minidiff.plumbing import flags
from minidiff.plumbing.device import add_precision_flags
from minidiff.plumbing.sampling_cli import (
    add_sampler_flags,
    load_for_sampling,
    sampler_config,
)

try:
    import uvicorn

    from minidiff.serving.app import Service, make_app
    from minidiff.serving.engine import Engine
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
    p.add_argument("--gather-ms", type=float, default=10.0, help="an idle server waits this long after a request "
                   "for others sent with it, so that they start in one batch")
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


async def serve(app, sock: socket.socket) -> None:
    """Run uvicorn on the socket; print the URL once it listens."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"minidiff serving on http://{shown}:{port}/", flush=True)
    await task


def main(argv=None) -> int:
    args = parse_args(argv)
    if uvicorn is None:
        raise UserError(f"serve.py needs the serve extra ({MISSING}); install it with pip install -e \".[serve]\".")
    for name in ("batch_size", "queue_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}.")
    if not 0 <= args.gather_ms <= 10_000:
        raise UserError(f"--gather-ms must be between 0 and 10000, got {args.gather_ms}.")
    config = sampler_config(args)
    sock = listening_socket(args.host, args.port)
    model, tok, precision = load_for_sampling(args)
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    engine = Engine(model, tok.mask_id, tok.eos_id, precision, args.batch_size, args.queue_size,
                    args.gather_ms / 1000)
    device = next(iter(model.parameters())).device
    service = Service(name, tok, config, model.config.max_position_embeddings, engine, device)
    asyncio.run(serve(make_app(service), sock))
    return 0


if __name__ == "__main__":
    run_cli(main)
