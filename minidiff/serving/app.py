"""The HTTP side: Starlette routes over the Engine, replies as JSON or server-sent events.

A stream sends one chunk per committed block and choice (the text it settled: settled.py), then
`data: [DONE]`; with trace: true also an `event: step` after every step, and a `: keep-alive`
comment when a block is slow. Tokenizing, decoding and stop matching run in threads, never on the
event loop. Reader's page: docs/serving.md.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minidiff.data.chat import StopRules
from minidiff.sampler import SamplerConfig
from minidiff.serving.api import ApiError, Job, Limits, choice, completion, finish_reason, parse_job, text_of, usage
from minidiff.serving.batch import Row
from minidiff.serving.engine import Busy, Committed, Engine, Failed, Stepped, Ticket
from minidiff.serving.ops import Guard, Metrics
from minidiff.serving.page import cells, page_html
from minidiff.serving.settled import settled_text

KEEPALIVE = 10.0  # seconds of silence after which a stream sends a comment


@dataclass
class Service:
    """What the routes share."""
    name: str
    tok: object
    config: SamplerConfig
    limits: Limits
    engine: Engine
    device: object
    metrics: Metrics
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None  # the Host names requests may carry (None: any)
    body_limit: int = 1 << 20  # bytes
    deadline: float = 600.0  # seconds a request may take from its arrival
    draining: bool = False  # SIGTERM: finishing what runs, accepting nothing new


def sse(payload, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused unless JSON (415) and refused while reading once past `limit` bytes (413)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be application/json, got '{kind or 'none'}'.")
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes.")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def events_of(service: Service, tickets: list[Ticket], start: float, tick: float):
    """(index, event) of the request's rows until each finished or one failed; None every `tick`
    seconds (a time to look at the client); ApiError 504 past the deadline."""
    queue, left, first, ticked = tickets[0].events, len(tickets), True, time.monotonic()
    while left:
        now = time.monotonic()
        if now - ticked >= tick:
            ticked = now
            yield None
        wait = min(tick, start + service.deadline - now)
        if wait <= 0:
            raise ApiError(504, f"the request ran past this server's deadline of {service.deadline:g} s.",
                           kind="server_error", code="timeout")
        try:
            index, event = await asyncio.wait_for(queue.get(), wait)
        except asyncio.TimeoutError:
            continue
        if isinstance(event, Committed) and first:
            service.metrics.first_block.observe(time.monotonic() - start)
            first = False
        yield index, event
        if isinstance(event, Failed):
            return
        left -= isinstance(event, Committed) and event.finished


def step_frame(tok, event: Stepped | Committed, index: int) -> dict:
    if isinstance(event, Stepped):
        return {"index": index, "cells": cells(tok, event.answer, tok.mask_id), "new": event.new,
                "block": list(event.block)}
    end = len(event.answer)  # the last frame: the answer after the stop rules
    return {"index": index, "cells": cells(tok, event.answer, tok.mask_id), "new": [], "block": [end, end]}


def settled(job: Job, tok, event: Committed) -> tuple[str, str | None]:
    """The text of a choice that no later block changes (a middle: all at the end), its finish."""
    finish = finish_reason(job, tok, event.answer) if event.finished else None
    if job.suffix:
        return text_of(job, tok, event.answer) if event.finished else "", finish
    return settled_text(tok, event.answer, job.config.stop_strings, event.finished), finish


async def stream(request: Request, service: Service, job: Job, tickets: list[Ticket], start: float):
    """The chunks of one request: per committed block and choice, [DONE] last."""
    tok, sent, texts, answers = service.tok, {}, {}, {}
    try:
        async for item in events_of(service, tickets, start, KEEPALIVE):
            if item is None:
                yield ": keep-alive\n\n"
                continue
            index, event = item
            if isinstance(event, Failed):
                yield sse(ApiError(500, event.message, kind="server_error").body())
                break
            if isinstance(event, Stepped) or (event.finished and job.trace):
                yield sse(await asyncio.to_thread(step_frame, tok, event, index), "step")
            if isinstance(event, Stepped):
                continue
            text, finish = await asyncio.to_thread(settled, job, tok, event)
            piece = choice(job, index, text[len(sent.get(index, "")):], finish, index not in sent, delta=True)
            yield sse(completion(job, service.name, [piece], None, chunked=True))
            sent[index] = text
            if event.finished:
                texts[index], answers[index] = text, event.answer
        if len(texts) == len(tickets):
            counts = await asyncio.to_thread(usage, job, tok, list(answers.values()), list(texts.values()))
            request.state.tokens = (counts["prompt_tokens"], counts["completion_tokens"])
            if job.include_usage:
                yield sse(completion(job, service.name, [], counts, chunked=True))
    except ApiError as error:  # the deadline
        yield sse(error.body())
    finally:
        service.engine.cancel(tickets)
    yield "data: [DONE]\n\n"


async def answer(request: Request, service: Service, job: Job, tickets: list[Ticket], start: float) -> Response:
    """The whole answer of a plain request; 499 when the client left before it (its rows are freed)."""
    answers = {}
    try:
        async for item in events_of(service, tickets, start, 0.25):
            if item is None:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            index, event = item
            if isinstance(event, Failed):
                raise ApiError(500, event.message, kind="server_error")
            if isinstance(event, Committed) and event.finished:
                answers[index] = event.answer
    finally:
        service.engine.cancel(tickets)
    body = await asyncio.to_thread(whole_answer, service, job, [answers[i] for i in range(len(tickets))])
    request.state.tokens = (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return JSONResponse(body)


def whole_answer(service: Service, job: Job, answers: list[list[int]]) -> dict:
    """The completion object of the finished answers (decoding: in a thread)."""
    tok = service.tok
    texts = [text_of(job, tok, answer) for answer in answers]
    choices = [choice(job, i, text, finish_reason(job, tok, a)) for i, (text, a) in enumerate(zip(texts, answers))]
    return completion(job, service.name, choices, usage(job, tok, answers, texts))


def rows_of(service: Service, job: Job) -> list[Row]:
    """One row per choice; a middle ignores the stop rules (as the sampler's infill does)."""
    tok, rows = service.tok, []
    for config, prompt in zip(job.configs(), [p for p in job.prompts for _ in range(job.n)]):
        stop_config = config.replace(stop_strings=(), stop_at_eos=False) if job.suffix else config
        stops = StopRules.make(stop_config, tok, tok.pad_id, tok.eos_id)
        rows.append(Row.start(prompt, config, stops, tok.mask_id, service.device, job.suffix))
    return rows


async def complete(request: Request, chat: bool, page: bool = False) -> Response:
    """POST /v1/chat/completions (chat), /v1/completions, or the page's /page/chat (trace allowed)."""
    start, service = time.monotonic(), request.app.state.service
    if service.draining:
        raise ApiError(503, "the server is shutting down; retry on another replica.", kind="server_error")
    raw = await read_body(request, service.body_limit)
    job = await asyncio.to_thread(parse_job, raw, chat=chat, tok=service.tok, model_name=service.name,
                                  base=service.config, limits=service.limits, trace_allowed=page)
    request.state.request_id = job.id
    rows = await asyncio.to_thread(rows_of, service, job)
    try:
        tickets = service.engine.submit(rows, job.id, trace=job.trace and job.stream)
    except Busy as error:
        service.metrics.queue_full.inc()
        raise ApiError(429, f"the server is busy ({error}); retry after a second.", code="queue_full",
                       kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    if job.stream:
        return StreamingResponse(stream(request, service, job, tickets, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await answer(request, service, job, tickets, start)


async def models(request: Request) -> Response:
    name = request.app.state.service.name
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                     "owned_by": "minidiff"}]})


async def health(request: Request) -> Response:
    """503 when the worker has died or the model failed its last blocks."""
    engine = request.app.state.service.engine
    status = "ok" if engine.alive() else "dead" if engine.worker is None or engine.worker.done() else "failing"
    return JSONResponse({"status": status, **engine.stats()}, status_code=200 if status == "ok" else 503)


async def ready(request: Request) -> Response:
    """For a load balancer: 200 while healthy and taking requests, 503 otherwise."""
    service = request.app.state.service
    ok = service.engine.alive() and not service.draining
    return JSONResponse({"ready": ok, **service.engine.stats()}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    body, kind = request.app.state.service.metrics.exposition()
    return Response(body, headers={"Content-Type": kind})


async def page(request: Request) -> Response:
    return HTMLResponse(page_html(request.app.state.service.name))


async def api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own (an unknown path, a wrong method) as OpenAI's error object."""
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(error.status_code)
    message = f"{request.method} {request.url.path}: {error.detail}"
    return await api_error(request, ApiError(error.status_code, message, code=code, headers=error.headers))


async def server_error(request: Request, error: Exception) -> Response:
    return await api_error(request, ApiError(500, f"the server failed: {error!r}", kind="server_error"))


def report_failure(worker: asyncio.Task) -> None:
    """The worker never ends but by cancellation: anything else is printed, not lost."""
    if not worker.cancelled() and worker.exception() is not None:
        traceback.print_exception(worker.exception(), file=sys.stderr)


def make_app(service: Service) -> Starlette:
    """The application; its lifespan runs the engine's worker."""
    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(service.engine.run())
        worker.add_done_callback(report_failure)
        yield
        worker.cancel()
        service.engine.close()

    post = {"methods": ["POST"]}
    routes = [Route("/", page), Route("/health", health), Route("/ready", ready), Route("/metrics", metrics),
              Route("/v1/models", models),
              Route("/v1/chat/completions", partial(complete, chat=True), **post),
              Route("/v1/completions", partial(complete, chat=False), **post),
              Route("/page/chat", partial(complete, chat=True, page=True), **post)]
    service.metrics.watch(service.engine)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Guard, metrics=service.metrics,
                                                                            key=service.api_key,
                                                                            hosts=service.allowed_hosts)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.service = service
    return app
