"""A CPU-time budget for a block of Python code running in one thread of many.

One image of an untrusted URL list can hold work that no byte or pixel cap bounds (an EXIF block with thousands of
tags of hundreds of values each keeps a pure-Python parser busy for minutes). :func:`cpu_budget` bounds the CPU
time that the calling thread spends inside a ``with`` block: a watchdog thread reads the thread's own CPU clock
and, once the budget is spent, raises :class:`OverBudget` in it (``PyThreadState_SetAsyncExc``). CPU time, not
wall time: a thread waiting behind 63 others for the GIL is not charged for their work.

The exception is delivered the next time the thread runs Python bytecode, so work inside one C call (a decode)
finishes first: those are bounded by the pixel cap. It is delivered at most once per block, and never after the
block has ended::

    try:
        with cpu_budget(5.0):
            work()
    except OverBudget:
        ...  # the row's state
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator


class OverBudget(BaseException):
    """Raised in a thread whose block used up its CPU budget (a BaseException: ``except Exception`` in the
    libraries it interrupts does not swallow it)."""


class _Watch:
    __slots__ = ("ident", "clock", "limit", "active", "fired")

    def __init__(self, ident: int, clock: int, limit: float):
        self.ident, self.clock, self.limit = ident, clock, limit
        self.active, self.fired = True, False


class _Watchdog:
    """One thread per process that checks every watched thread's CPU clock ``interval`` times a second."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.lock = threading.Lock()
        self.watches: set[_Watch] = set()
        self.thread: threading.Thread | None = None

    def add(self, watch: _Watch) -> None:
        with self.lock:
            self.watches.add(watch)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="cpu-budget", daemon=True)
                self.thread.start()

    def remove(self, watch: _Watch) -> None:
        with self.lock:
            watch.active = False
            self.watches.discard(watch)
            if watch.fired:  # fired but not yet delivered: take it back
                _async_raise(watch.ident, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self.lock:
                for watch in list(self.watches):
                    try:
                        spent = time.clock_gettime(watch.clock)
                    except OSError:  # the thread ended
                        self.watches.discard(watch)
                        continue
                    if watch.active and not watch.fired and spent >= watch.limit:
                        watch.fired = True
                        _async_raise(watch.ident, OverBudget)


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def cpu_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`OverBudget` in this thread once the block has used ``seconds`` of its CPU time (where the
    platform has per-thread CPU clocks; elsewhere the block is not bounded)."""
    ident = threading.get_ident()
    try:
        clock = time.pthread_getcpuclockid(ident)
        start = time.clock_gettime(clock)
    except (AttributeError, OSError):  # no per-thread CPU clock here
        yield
        return
    watch = _Watch(ident, clock, start + seconds)
    _WATCHDOG.add(watch)
    try:
        yield
    finally:
        _WATCHDOG.remove(watch)
