"""An ordered, bounded pipeline of chunk jobs for the encrypting streams.

Chunks of an encrypted checkpoint are independent, so they are sealed and
opened on a few threads (``cryptography`` and ``hmac`` release the GIL for
large buffers), but they must reach the file, or the reader's caller, in
order.  :class:`OrderedPipeline` keeps at most ``depth`` jobs in flight and
hands results back in submission order; a job's exception is raised when
that job is popped, so errors surface in stream order too.  With one worker
it runs each job inline, on the caller's thread, with no executor at all.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torchaux.checkpoint.cpu_time import counting

__all__ = ["OrderedPipeline", "default_workers", "check_workers", "THREAD_NAME_PREFIX"]

#: Name prefix of the worker threads (visible in debuggers and py-spy dumps).
THREAD_NAME_PREFIX = "torchaux-crypto"
# Upper bound of the default worker count (``TORCHAUX_ENCRYPTION_WORKERS``
# overrides the count, _knobs.py).  Eight cores of AES-CBC (~0.75 GB/s
# each, measured) already outrun most disks; more threads only buffer more.
_MAX_DEFAULT_WORKERS = 8


def default_workers(aead: bool) -> int:
    """Threads used for ``workers=None``: 1 for AES-GCM, else usable cores (at most 8).

    One core of AES-GCM (~10 GB/s with VAES, several GB/s with AES-NI) already
    outruns storage, and measured a second thread gained nothing (GIL
    hand-offs cost as much as the 0.4 ms a 4 MiB chunk takes); the CBC modes
    run 0.1-0.8 GB/s per core and scale with cores.
    """
    if aead:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_DEFAULT_WORKERS))


def check_workers(workers: object) -> int | None:
    """``workers`` checked (TypeError, ValueError); ``None`` stays (see :func:`default_workers`)."""
    if workers is None:
        return None
    if not isinstance(workers, int) or isinstance(workers, bool):
        raise TypeError(f"workers must be an int or None; got {type(workers).__name__}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for one per core); got {workers}")
    return workers


class OrderedPipeline:
    """Runs jobs on ``workers`` threads and returns their results in submission order.

    Callers check :meth:`full` before :meth:`submit` (and :meth:`pop` first if
    it is), which bounds the jobs alive (queued, running or finished but not
    yet popped) to ``depth``: twice the workers, so every worker has a next
    job ready while the caller consumes the oldest result.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.depth = 1 if workers == 1 else 2 * workers
        self._executor: ThreadPoolExecutor | None = None
        if workers > 1:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_NAME_PREFIX)
        self._jobs: deque[tuple[Future[Any], Any]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def full(self) -> bool:
        """Whether a :meth:`submit` now would exceed ``depth`` jobs."""
        return len(self._jobs) >= self.depth

    def submit(self, fn: Callable[..., Any], *args: Any, context: Any = None) -> Future[Any]:
        """Start ``fn(*args)``; :meth:`pop` returns its result with ``context`` in order."""
        if self._closed or len(self._jobs) >= self.depth:
            raise RuntimeError(f"pipeline closed or full ({self.depth} jobs): pop() first")
        if self._executor is None:
            future: Future[Any] = Future()
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - re-raised by pop(), in stream order
                future.set_exception(exc)
        else:
            future = self._executor.submit(counting(fn), *args)
        self._jobs.append((future, context))
        return future

    def pop(self) -> tuple[Any, Any]:
        """Wait for the oldest job; return ``(result, context)`` or raise its exception."""
        future, context = self._jobs.popleft()
        return future.result(), context

    def close(self) -> None:
        """Drop queued jobs, wait for running ones and stop the threads (idempotent)."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._jobs.clear()
