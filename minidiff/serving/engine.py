"""The batcher: one worker owns the model; requests join and leave the batch at block boundaries.

At every boundary the worker drops the rows whose client left, admits waiting ones while the
batch has room and runs the next block of the group (batch.batch_key) holding the row served
longest ago, in the model's own thread. Each row then gets a `Committed` event; a traced row also
a `Stepped` event per step. A full queue is `Busy` (429). Reader's page: docs/serving.md.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from minidiff.serving.batch import Row, batch_key, denoise_block, step_callback


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
    """What a request holds while the engine works on it: its row and its events."""
    row: Row
    trace: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    served: int = -1  # the boundary after its last block (-1: not run yet)


class Engine:
    """The batch (at most `batch_size` rows), the queue (at most `queue_size` waiting) and the
    seconds an idle worker waits for requests sent together (`gather`)."""

    def __init__(self, model, mask_id: int, eos_id: int, precision, batch_size: int, queue_size: int,
                 gather: float = 0.0):
        self.model, self.mask_id, self.eos_id, self.precision = model, mask_id, eos_id, precision
        self.batch_size, self.queue_size, self.gather = batch_size, queue_size, gather
        self.waiting: deque[Ticket] = deque()
        self.active: list[Ticket] = []
        self.blocks = 0  # blocks run (of any group)
        self.wake = asyncio.Event()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="minidiff-model")

    def submit(self, row: Row, trace: bool = False) -> Ticket:
        """Queue a request; Busy when `queue_size` requests already wait."""
        if len(self.waiting) >= self.queue_size:
            raise Busy(f"{len(self.waiting)} requests are waiting, the most this server queues")
        ticket = Ticket(row, trace)
        self.waiting.append(ticket)
        self.wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client left: a waiting request goes now, an active row at the next boundary."""
        ticket.cancelled = True
        if ticket in self.waiting:
            self.waiting.remove(ticket)

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting), "blocks": self.blocks}

    def admit(self) -> None:
        self.active = [t for t in self.active if not t.cancelled]
        while self.waiting and len(self.active) < self.batch_size:
            self.active.append(self.waiting.popleft())

    def next_group(self) -> list[Ticket]:
        """The active rows sharing the batch key of the row served longest ago."""
        groups: dict[tuple, list[Ticket]] = {}
        for ticket in self.active:
            groups.setdefault(batch_key(ticket.row), []).append(ticket)
        return min(groups.values(), key=lambda group: min(t.served for t in group))

    async def run(self) -> None:
        """The worker: block after block while rows are active, asleep otherwise."""
        while True:
            self.admit()
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                await asyncio.sleep(self.gather)
                continue
            await self.run_group(self.next_group())

    async def run_group(self, group: list[Ticket]) -> None:
        """One block of the group in the model's thread, then each row's event."""
        loop = asyncio.get_running_loop()
        rows = [t.row for t in group]
        traced = [r for r, t in enumerate(group) if t.trace]

        def send(r: int, answer: list[int], new: list[int]) -> None:  # from the model's thread
            start = rows[r].block * rows[r].config.block_length
            step = Stepped(answer, new, (start, start + rows[r].width))
            loop.call_soon_threadsafe(group[r].events.put_nowait, step)

        callback = step_callback(rows, traced, send) if traced else None
        try:
            await loop.run_in_executor(self.thread, self.denoise, rows, callback)
            events = [Committed(row.answer, row.finished) for row in rows]
        except Exception as error:  # the model's failure ends these requests, not the server
            events = [Failed(f"the model failed on this request's block: {error}")] * len(rows)
            for row in rows:
                row.finished = True
        self.blocks += 1
        for ticket, event in zip(group, events):
            ticket.served = self.blocks
            ticket.events.put_nowait(event)
        self.active = [t for t in self.active if not t.row.finished]

    def denoise(self, rows: list[Row], callback) -> None:
        """In the model's thread (autocast is per thread)."""
        with self.precision.autocast():
            denoise_block(self.model, rows, self.mask_id, self.eos_id, callback)

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)
