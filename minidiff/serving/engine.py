"""The batcher: one worker owns the model; requests join and leave the batch at block boundaries.

Waiting requests are admitted oldest first while the batch has rows and tokens to spare. Active
rows at a block boundary form groups (batch.batch_key, and batch.invariant_key: one padded canvas
length, so that batching never changes an answer); a group's block is a `BlockRun`, and the
runs take turns a step at a time, the one holding the row that waited longest first, so a short
request beside a long block waits a few steps. Each row gets a `Committed` event per block (a
traced row a `Stepped` per step). A full queue is `Busy` (429). Reader's page: docs/serving.md.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from minidiff.serving.batch import BlockRun, Row, batch_key, invariant_key, step_callback
from minidiff.speed.invariance import exact_products, padded_length

log = logging.getLogger("minidiff.serve")
STEP_BACKLOG = 256  # trace frames a request's queue holds at most; later ones are dropped until it drains
FAILING = 3  # blocks failed in a row after which /health says the server is failing


@dataclass
class Committed:
    """A block boundary: the answer so far (committed blocks, then <mask>)."""
    answer: list[int]
    finished: bool


@dataclass
class Stepped:
    """One step of a traced row: its answer now and the answer offsets this step committed."""
    answer: list[int]
    new: list[int]
    block: tuple[int, int]  # the current block's answer offsets [start, end)


@dataclass
class Failed:
    """The model failed on this row's block; the request ends with this message."""
    message: str


class Busy(Exception):
    """The queue of waiting requests is full."""


@dataclass
class Ticket:
    """One row of a request while the engine works on it; its events go to the request's queue
    as (index, event)."""
    row: Row
    index: int
    events: asyncio.Queue
    request: str = ""  # the request's id, for the log
    trace: bool = False
    cancelled: bool = False
    since: float = field(default_factory=time.monotonic)  # waiting since (arrival, or its last turn)


def model_thread() -> ThreadPoolExecutor:
    """The one thread that runs the model. Load the model in it too (`submit(load).result()`): on
    the CPU, a model whose OpenMP work began in another thread runs slower here (docs/serving.md,
    "One worker owns the model")."""
    return ThreadPoolExecutor(1, thread_name_prefix="minidiff-model")


class Engine:
    """The batch (at most `batch_size` rows and `token_budget` canvas positions), the queue (at
    most `queue_size` rows waiting), the seconds an idle worker waits for requests sent together;
    `bucket`: canvases padded to a multiple of it, groups of one padded length (0: padded to the
    batch's longest, any lengths together)."""

    def __init__(self, model, mask_id: int, eos_id: int, precision, batch_size: int, queue_size: int,
                 gather: float = 0.0, token_budget: int | None = None, metrics=None, bucket: int = 0,
                 thread: ThreadPoolExecutor | None = None):
        self.model, self.mask_id, self.eos_id, self.precision = model, mask_id, eos_id, precision
        self.batch_size, self.queue_size, self.gather = batch_size, queue_size, gather
        self.token_budget, self.metrics, self.bucket = token_budget, metrics, bucket
        # packed (oneDNN) products round a row alike whatever the row count; MKL's may not
        self.exact_products = exact_products(model)
        self.waiting: deque[Ticket] = deque()
        self.active: list[Ticket] = []
        self.runs: dict[tuple, tuple[BlockRun, list[Ticket], float]] = {}  # key -> run, its tickets, start
        self.blocks, self.failures, self.worker = 0, 0, None  # blocks run; failed in a row; the task
        self.wake, self.arrived = asyncio.Event(), threading.Event()
        self.thread = thread or model_thread()

    def submit(self, rows: list[Row], request: str = "", trace: bool = False) -> list[Ticket]:
        """Queue a request's rows (one queue of events for all); Busy when they do not fit."""
        if len(self.waiting) + len(rows) > self.queue_size:
            raise Busy(f"{len(self.waiting)} rows are waiting, at most {self.queue_size} may")
        events = asyncio.Queue()
        tickets = [Ticket(row, i, events, request, trace) for i, row in enumerate(rows)]
        self.waiting.extend(tickets)
        self.wake.set()
        self.arrived.set()
        return tickets

    def cancel(self, tickets: list[Ticket]) -> None:
        """The client left: waiting rows go now, active ones at the next boundary."""
        for ticket in tickets:
            ticket.cancelled = True
            if ticket in self.waiting:
                self.waiting.remove(ticket)
        self.arrived.set()

    def alive(self) -> bool:
        return self.worker is not None and not self.worker.done() and self.failures < FAILING

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting), "blocks": self.blocks}

    def admit(self) -> None:
        """Drop rows whose client left; admit waiting rows while rows and tokens allow: the oldest,
        then the waiting rows that would share its group (oldest first), then the next oldest..."""
        self.active = [t for t in self.active if not t.cancelled]
        for key in [k for k, (_, tickets, _) in self.runs.items() if all(t.cancelled for t in tickets)]:
            del self.runs[key]
        used = sum(padded_length(t.row.tokens, self.bucket) for t in self.active)
        while self.waiting and self.fits(self.waiting[0], used):
            group = self.key(self.waiting[0])
            for ticket in [t for t in self.waiting if self.key(t) == group]:  # the oldest first: it fits
                if not self.fits(ticket, used):
                    break
                self.waiting.remove(ticket)
                self.active.append(ticket)
                used += padded_length(ticket.row.tokens, self.bucket)

    def fits(self, ticket: Ticket, used: int) -> bool:
        """Is there a row, and (unless the batch is empty) room in the token budget, for it?"""
        tokens = padded_length(ticket.row.tokens, self.bucket)
        budget_ok = not self.active or not self.token_budget or used + tokens <= self.token_budget
        return len(self.active) < self.batch_size and budget_ok

    def key(self, ticket: Ticket) -> tuple:
        """Its group: rows of one key share a block's steps (batch.batch_key, batch.invariant_key)."""
        return batch_key(ticket.row) + invariant_key(ticket.row, self.bucket, self.exact_products)

    def candidates(self) -> list[tuple[tuple, list[Ticket]]]:
        """The runs under way, and new groups of rows at a boundary whose key runs nothing."""
        running = {id(t) for _, tickets, _ in self.runs.values() for t in tickets}
        groups: dict[tuple, list[Ticket]] = {}
        for ticket in self.active:
            key = self.key(ticket)
            if id(ticket) not in running and key not in self.runs:
                groups.setdefault(key, []).append(ticket)
        return [(key, tickets) for key, (_, tickets, _) in self.runs.items()] + list(groups.items())

    async def run(self) -> None:
        """The worker: turn after turn while rows are active, asleep otherwise."""
        self.worker = asyncio.current_task()
        while True:
            self.arrived.clear()  # before the candidates: a later arrival pauses the turn
            self.admit()
            candidates = self.candidates()
            if not candidates:
                self.wake.clear()
                await self.wake.wait()
                await self.gathered()
                continue
            key, tickets = min(candidates, key=lambda c: min(t.since for t in c[1]))
            await self.turn(key, tickets, contended=len(candidates) > 1)

    async def gathered(self) -> None:
        """Requests sent together: sleep until none arrived for `gather` seconds (at most 10 of them)."""
        for _ in range(10):
            self.arrived.clear()
            await asyncio.sleep(self.gather)
            if not self.arrived.is_set():
                return

    async def turn(self, key: tuple, tickets: list[Ticket], contended: bool) -> None:
        """Steps of one group in the model's thread (one if others wait); at its block's end, events."""
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(self.thread, self.advance, key, tickets, contended, loop)
        except Exception as error:  # the model's failure ends these requests, not the server
            self.runs.pop(key, None)
            self.failed(tickets, error)
            return
        now = time.monotonic()
        for ticket in tickets:
            ticket.since = now
        if done:
            self.ended(key, tickets, now)

    def advance(self, key: tuple, tickets: list[Ticket], contended: bool, loop) -> bool:
        """In the model's thread (autocast is per thread): start the group's run if new, then step it."""
        with self.precision.autocast():
            if key not in self.runs:
                rows = [t.row for t in tickets]
                traced = [r for r, t in enumerate(tickets) if t.trace]
                callback = step_callback(rows, traced, self.sender(tickets, loop)) if traced else None
                run = BlockRun(self.model, rows, self.mask_id, self.eos_id, callback, self.bucket)
                self.runs[key] = (run, tickets, time.monotonic())
            return self.runs[key][0].advance(lambda: contended or self.arrived.is_set())

    def sender(self, tickets: list[Ticket], loop):
        """A step_callback's send: the Stepped event of row r, from the model's thread."""
        def send(r: int, answer: list[int], new: list[int]) -> None:
            ticket, row = tickets[r], tickets[r].row
            start = row.block * row.config.block_length
            if ticket.events.qsize() < STEP_BACKLOG:  # a reader that lags loses frames, not memory
                step = Stepped(answer, new, (start, start + row.width))
                loop.call_soon_threadsafe(ticket.events.put_nowait, (ticket.index, step))
        return send

    def ended(self, key: tuple, tickets: list[Ticket], now: float) -> None:
        """A run's block is over: each row's Committed event; finished rows leave."""
        _, _, started = self.runs.pop(key)
        self.blocks, self.failures = self.blocks + 1, 0
        if self.metrics is not None:
            self.metrics.block_seconds.observe(now - started)
        for ticket in tickets:
            ticket.events.put_nowait((ticket.index, Committed(ticket.row.answer, ticket.row.finished)))
        self.active = [t for t in self.active if not t.row.finished]

    def failed(self, tickets: list[Ticket], error: Exception) -> None:
        """The model failed on a run: its requests get Failed and leave; the failure is logged."""
        self.failures += 1
        if self.metrics is not None:
            self.metrics.failures.inc()
        requests = sorted({t.request for t in tickets})
        log.error("model failure on requests %s: %r", " ".join(requests), error, exc_info=error)
        for ticket in tickets:
            ticket.row.finished = True
            message = f"the model failed on this request's block: {error}"
            ticket.events.put_nowait((ticket.index, Failed(message)))
        self.active = [t for t in self.active if not t.row.finished]

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)
