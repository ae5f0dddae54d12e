"""Operations around every request: the API key, the access log, the Prometheus metrics.

`Guard` is an ASGI middleware: without the key a /v1 route (or the page's) gets 401; every
request, when it ends, adds one access-log line (id, route, status, tokens, seconds) and one
count to `minidiff_requests_total`. The handlers put the id and token counts in the request's
state. Reader's page: docs/serving.md ("Operations").
"""
from __future__ import annotations

import hmac
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import JSONResponse

from minidiff.serving.api import ApiError

log = logging.getLogger("minidiff.serve")
ROUTES = ("/", "/health", "/ready", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/page/chat")
SECONDS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300)  # histogram buckets


class Metrics:
    """The server's metrics, in a registry of its own."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("minidiff_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("minidiff_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.completion_tokens = Counter("minidiff_completion_tokens", "tokens of the texts returned", registry=r)
        self.queue_full = Counter("minidiff_queue_full", "requests answered 429 (queue full)", registry=r)
        self.failures = Counter("minidiff_model_failures", "blocks the model failed on", registry=r)
        self.first_block = Histogram("minidiff_time_to_first_block_seconds", "from a request's arrival to its "
                                     "first committed block", buckets=SECONDS, registry=r)
        self.block_seconds = Histogram("minidiff_block_seconds", "a block's wall time, its first step to its "
                                       "commit (turns of other groups included)", buckets=SECONDS, registry=r)
        self.queue = Gauge("minidiff_queue_depth", "rows waiting for a place in the batch", registry=r)
        self.rows = Gauge("minidiff_batch_rows", "rows in the batch", registry=r)

    def watch(self, engine) -> None:
        """The gauges read the engine at every scrape."""
        self.queue.set_function(lambda: len(engine.waiting))
        self.rows.set_function(lambda: len(engine.active))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def guarded(path: str) -> bool:
    return path.startswith("/v1/") or path == "/page/chat"


def host_name(scope) -> str:
    """The Host header's name without its port ("[::1]:8000" -> "::1"), lower case."""
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
    if host.startswith("["):  # an IPv6 address
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """The Host and key checks, the access log and the request count, around the application.
    `hosts`: the Host names a request may carry (None: any), so that a web page whose name was
    rebound to this address cannot call a server on localhost from the user's browser."""

    def __init__(self, app, metrics: Metrics, key: str | None, hosts: tuple[str, ...] | None = None):
        self.app, self.metrics, self.key, self.hosts = app, metrics, key, hosts

    def authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, state = time.monotonic(), [500], scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.hosts is not None and host_name(scope) not in self.hosts:
                error = ApiError(400, f"the Host header {host_name(scope)!r} is not one this server answers to "
                                      f"({', '.join(self.hosts)}; serve.py --allowed-hosts).", code="invalid_host")
                await JSONResponse(error.body(), 400)(scope, receive, sending)
            elif self.key and guarded(scope["path"]) and not self.authorized(scope):
                error = ApiError(401, "a valid API key is required: send the header Authorization: Bearer KEY.",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), 401, {"WWW-Authenticate": "Bearer"})(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            self.record(scope, status[0], state, time.monotonic() - start)

    def record(self, scope, status: int, state: dict, seconds: float) -> None:
        route = scope["path"] if scope["path"] in ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        prompt, completion = state.get("tokens", (0, 0))
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        level = logging.DEBUG if route in ("/health", "/ready", "/metrics") and status < 400 else logging.INFO
        log.log(level, "%s %s %s %d prompt_tokens=%d completion_tokens=%d %.3fs", state.get("request_id", "-"),
                scope["method"], scope["path"], status, prompt, completion, seconds)
