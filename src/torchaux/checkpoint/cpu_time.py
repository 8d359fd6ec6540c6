"""CPU seconds spent by torchaux's background threads, process-wide.

The cost of a background save that the training loop pays is its wall time, but
also the cores the writer takes from it (docs/benchmarks.md).  Every background
thread of a thread saver counts its own CPU time here (``time.thread_time``:
CPU only, so waiting on the disk or a queue costs nothing): the writer thread,
the direct-I/O write-behind thread, the zlib fallback's CRC thread and the
cipher pool.  ``torchaux bench`` reports it per GiB saved.  A
:class:`~torchaux.checkpoint.ProcessSaver`'s writer runs in another process
and is not counted.

>>> before = background_cpu_seconds()
>>> with counted():
...     _ = sum(range(100_000))
>>> background_cpu_seconds() > before
True
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["background_cpu_seconds", "counted", "counting"]

_lock = threading.Lock()
_total = [0.0]
_T = TypeVar("_T")


def background_cpu_seconds() -> float:
    """Total CPU seconds of torchaux background work so far in this process."""
    with _lock:
        return _total[0]


@contextlib.contextmanager
def counted() -> Iterator[None]:
    """Add the CPU time the calling thread spends inside the block to the total."""
    start = time.thread_time()
    try:
        yield
    finally:
        spent = time.thread_time() - start
        with _lock:
            _total[0] += spent


def counting(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``fn`` wrapped in :func:`counted` (for work handed to a thread pool)."""

    def run(*args: Any) -> _T:
        with counted():
            return fn(*args)

    return run
