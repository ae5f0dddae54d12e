"""Progress reporting that suits where the output goes: tqdm in a terminal, a line every few seconds in a log.

    bar = progress.bar(total=steps, desc="train")             # bar.update(), .set_postfix(), .write(), .close()
    for start in progress.bar(range(0, n, b), desc="perplexity"):   # or wrap an iterable
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

INTERVAL_S = 5.0  # seconds between two lines when the output is not a terminal


class LineProgress:
    """tqdm's small interface, writing lines `desc: n/total unit [k=v ...]`."""

    def __init__(self, iterable=None, *, total=None, desc: str = "", initial: int = 0,
                 file=None, interval: float = INTERVAL_S, clock=time.monotonic, unit: str = "it"):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.n, self.unit = iterable, total, desc, initial, unit
        self.file = file if file is not None else sys.stderr
        self.interval, self.clock, self.last_print = interval, clock, clock()
        self.postfix, self.printed_n, self.closed = "", initial, False

    def _line(self) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        head = f"{self.desc}: " if self.desc else ""
        tail = f" [{self.postfix}]" if self.postfix else ""
        return f"{head}{count} {self.unit}{tail}"

    def _print(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self.last_print, self.printed_n = self.clock(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_print >= self.interval:
            self._print()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        print(message, file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._print()
        self.closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


class _Silent(LineProgress):
    """disable=True: the same interface, nothing printed."""

    def _print(self) -> None:
        self.printed_n = self.n

    def write(self, message: str) -> None:
        pass


def bar(iterable=None, *, total=None, desc: str = "", disable: bool = False, initial: int = 0,
        file=None, unit: str = "it", interval: float = INTERVAL_S):
    """tqdm when `file` (default stderr) is a terminal, else a LineProgress; silent if disable."""
    file = file if file is not None else sys.stderr
    if disable:
        return _Silent(iterable, total=total, desc=desc, initial=initial, file=file)
    isatty = getattr(file, "isatty", None)
    try:
        terminal = bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        terminal = False
    if terminal:
        return tqdm(iterable, total=total, desc=desc, initial=initial, file=file, unit=unit, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, file=file, unit=unit, interval=interval)
