"""The HTTP side: Starlette routes over the Engine, replies as JSON or server-sent events.

A stream sends one chunk per committed block (the text it settled: settled.py), then `data: [DONE]`;
with trace: true also an `event: step` after every step. Reader's page: docs/serving.md.
"""
from __future__ import annotations

import asyncio
import json
import sys
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minidiff.data.chat import StopRules
from minidiff.plumbing.sampling_cli import answer_text
from minidiff.sampler import SamplerConfig
from minidiff.serving.api import ApiError, Job, chunk, completion, finish_reason, parse_job, usage
from minidiff.serving.batch import Row
from minidiff.serving.engine import Busy, Committed, Engine, Failed, Stepped, Ticket
from minidiff.serving.page import cells, page_html
from minidiff.serving.settled import settled_text


@dataclass
class Service:
    """What the routes share: the model's name, tokenizer, default settings, context and engine."""
    name: str
    tok: object
    config: SamplerConfig
    context: int  # the model's max_position_embeddings
    engine: Engine
    device: object


def sse(payload, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(service: Service, job: Job, ticket: Ticket):
    """The chunks of one request: one per committed block, [DONE] last; the row goes with the client."""
    tok, sent, first = service.tok, "", True
    try:
        while True:
            event = await ticket.events.get()
            if isinstance(event, Stepped):
                yield sse({"cells": cells(tok, event.answer, tok.mask_id), "new": event.new,
                           "block": list(event.block)}, "step")
                continue
            if isinstance(event, Failed):
                yield sse(ApiError(500, event.message, kind="server_error").body())
                break
            if event.finished and job.trace:  # the last frame: the answer after the stop rules
                end = len(event.answer)
                yield sse({"cells": cells(tok, event.answer, tok.mask_id), "new": [], "block": [end, end]}, "step")
            text = settled_text(tok, event.answer, job.config.stop_strings, event.finished)
            finish = finish_reason(tok, event.answer) if event.finished else None
            yield sse(chunk(job, service.name, text[len(sent):], finish, first))
            sent, first = text, False
            if event.finished:
                if job.include_usage:
                    yield sse({**chunk(job, service.name, None, None), "usage": usage(job, tok, event.answer)})
                break
        yield "data: [DONE]\n\n"
    finally:
        service.engine.cancel(ticket)


async def last_event(request: Request, service: Service, ticket: Ticket) -> Committed | Failed | None:
    """The request's final event; None when the client left before it (its row is then freed)."""
    async def final():
        while True:
            event = await ticket.events.get()
            if isinstance(event, Failed) or (isinstance(event, Committed) and event.finished):
                return event

    waiter = asyncio.ensure_future(final())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.25)
            if not waiter.done() and await request.is_disconnected():
                return None
        return waiter.result()
    finally:
        waiter.cancel()
        service.engine.cancel(ticket)


async def complete(request: Request, chat: bool) -> Response:
    """POST /v1/chat/completions (chat) or /v1/completions."""
    service: Service = request.app.state.service
    tok = service.tok
    job = parse_job(await request.body(), chat=chat, tok=tok, model_name=service.name, base=service.config,
                    context=service.context)
    stops = StopRules.make(job.config, tok, tok.pad_id, tok.eos_id)
    try:
        ticket = service.engine.submit(Row.start(job.prompt, job.config, stops, tok.mask_id, service.device),
                                       trace=job.trace and job.stream)
    except Busy as error:
        raise ApiError(429, f"the server is busy ({error}); retry after a second.", code="queue_full",
                       kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    if job.stream:
        return StreamingResponse(stream(service, job, ticket), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    event = await last_event(request, service, ticket)
    if event is None:
        return Response(status_code=499)  # nobody reads it: the client has gone
    if isinstance(event, Failed):
        raise ApiError(500, event.message, kind="server_error")
    text = answer_text(tok, event.answer)
    return JSONResponse(completion(job, service.name, text, finish_reason(tok, event.answer),
                                   usage(job, tok, event.answer)))


async def models(request: Request) -> Response:
    name = request.app.state.service.name
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                     "owned_by": "minidiff"}]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", **request.app.state.service.engine.stats()})


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

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", partial(complete, chat=True), methods=["POST"]),
              Route("/v1/completions", partial(complete, chat=False), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.service = service
    return app
