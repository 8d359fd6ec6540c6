"""Background writer: :class:`AsyncSaver` and the :class:`SaveHandle` it returns.

One saver owns one host buffer pool and one writer thread.  Saves are written
in submission order (two saves to one path can never race).  Back-pressure:
at most ``max_pending`` saves hold staging buffers at once (default one, knob
``TORCHAUX_MAX_PENDING_SAVES``), so peak extra host memory is bounded by that
many copies of the state; a new save waits in :meth:`AsyncSaver.reserve`.

Failures are never lost.  A failed save's original exception is re-raised by
:meth:`SaveHandle.wait`, by :func:`wait_saves`, or - if nobody looked at it -
by the next save on the same saver.  At interpreter exit every saver is
flushed; a failure found then is logged at ERROR level (nothing can be raised).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Literal

from torchaux import _knobs
from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.engine.staging import HostBufferPool, Snapshot
from torchaux.errors import SaveClosedError

if TYPE_CHECKING:
    from torchaux.training.affinity import CoreRange

__all__ = ["AsyncSaver", "SaveHandle", "wait_saves", "default_saver"]

_log = logging.getLogger("torchaux")


class SaveHandle:
    """The two phases of one asynchronous save.

    Attributes:
        staged: resolves (to ``None``) once the snapshot is fully on the host;
            from then on nothing the caller does can change the file.
        committed: resolves to the file path (or ``None`` for a file object)
            once the file is complete, renamed into place and fsynced.
    """

    def __init__(self, target: str | None) -> None:
        self.target = target
        self.staged: Future[None] = Future()
        self.committed: Future[str | None] = Future()
        self._observed = False

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until committed; re-raise the save's original exception if it failed.

        A failure counts as observed once it has been raised here.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        try:
            result = self.committed.result(timeout)
        except FutureTimeoutError:
            raise  # still pending: a later failure must still be reported
        except BaseException:
            self._observed = True
            raise
        self._observed = True
        return result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`wait` but return the failure instead of raising it."""
        exc = self.committed.exception(timeout)  # TimeoutError leaves it unobserved
        self._observed = True
        return exc

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self.committed.done()

    def __repr__(self) -> str:
        state = "pending"
        if self.committed.done():
            state = "failed" if self.committed.exception() is not None else "committed"
        elif self.staged.done():
            state = "staged"
        return f"SaveHandle(target={self.target!r}, {state})"


@dataclass
class _Job:
    snapshot: Snapshot
    write: Callable[[Snapshot], str | None]
    handle: SaveHandle


#: Opens the destination of a path save; yields a binary file and commits on
#: clean exit.  The default is :func:`torchaux.checkpoint.storage.commit.atomic_write`;
#: tests inject failing or gated sinks here.
Sink = Callable[[str], contextlib.AbstractContextManager[BinaryIO]]

_savers: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()


class AsyncSaver:
    """A writer thread plus a reusable staging pool.

    Args:
        max_pending: saves that may hold staging buffers at once (default:
            the ``TORCHAUX_MAX_PENDING_SAVES`` knob, 1).
        sink: opens a path for writing and commits it (default: atomic
            temp-file + fsync + rename).
        name: name of the writer thread.
        writer_cores: pin the writer thread to these cores (torch_npu's
            ``core_range`` forms, e.g. ``[2, 3]``), or ``"spare"`` for every core
            the constructing (training) thread is *not* bound to - useful once
            the trainer itself is pinned, so serialisation never steals its
            cores.  ``None`` (default) leaves the writer unpinned.

    Example:
        >>> import os, torch, torchaux
        >>> saver = AsyncSaver(max_pending=2)
        >>> h = torchaux.save_async(torch.zeros(3), os.path.join(doctest_tmp, "z.pt"), saver=saver)
        >>> saver.close()
        >>> h.done()
        True
    """

    def __init__(
        self,
        *,
        max_pending: int | None = None,
        sink: Sink = atomic_write,
        name: str = "torchaux-writer",
        writer_cores: CoreRange | Literal["spare"] | None = None,
    ) -> None:
        limit = _knobs.max_pending_saves() if max_pending is None else max_pending
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_pending must be an int >= 1, found {limit!r}")
        self.pool = HostBufferPool()
        self.sink = sink
        self._slots = threading.BoundedSemaphore(limit)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: set[SaveHandle] = set()
        self._unobserved: list[SaveHandle] = []
        self._closed = False
        self._name = name
        # Imported here: torchaux.training imports the checkpoint engine (graph
        # dumps are written through it), so a module-level import would be circular.
        from torchaux.training.affinity import _parse, cores_excluding, get_thread_affinity

        if writer_cores == "spare":
            spare = cores_excluding(get_thread_affinity())
            # No spare core (the trainer may use all of them): stay unpinned.
            writer_cores = spare or None
        elif isinstance(writer_cores, str):
            raise ValueError(f"writer_cores must be a core range, 'spare' or None, got {writer_cores!r}")
        elif writer_cores is not None:
            _parse(writer_cores)  # ValueError now, not later on the writer thread
        self._writer_cores = writer_cores
        self._thread: threading.Thread | None = None
        _savers.add(self)

    # -- caller side ----------------------------------------------------------

    def reserve(self) -> None:
        """Wait for a free staging slot, then surface unobserved earlier failures.

        Call before staging; pair with :meth:`submit` (which keeps the slot) or
        :meth:`cancel_reservation`.  Raises the original exception of the oldest
        failed save that nobody observed.
        """
        if self._closed:
            raise SaveClosedError("this AsyncSaver is closed; create a new one to save again")
        self._slots.acquire()
        failure = self._pop_unobserved()
        if failure is not None:
            self._slots.release()
            raise failure

    def cancel_reservation(self) -> None:
        """Give back a slot taken by :meth:`reserve` without submitting."""
        self._slots.release()

    def submit(
        self, snapshot: Snapshot, write: Callable[[Snapshot], str | None], target: str | None
    ) -> SaveHandle:
        """Queue ``write(snapshot)`` on the writer thread; returns its handle."""
        handle = SaveHandle(target)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._pending.add(handle)
        self._queue.put(_Job(snapshot, write, handle))
        return handle

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every pending save; raise the first failure nobody observed.

        Further unobserved failures stay queued: the next :meth:`wait` or save
        raises them, one per call.
        """
        self._wait_pending(timeout)
        failure = self._pop_unobserved()
        if failure is not None:
            raise failure

    # The two steps of waiting, overridable by subclasses (graph dumps add CUDA
    # graph replays to wait for and callback failures to report).
    def _wait_pending(self, timeout: float | None) -> None:
        with self._lock:
            pending = list(self._pending)
        for handle in pending:
            # Waits without marking the handle observed; a failure stays queued.
            handle.committed.exception(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush pending saves, stop the writer thread and free the pool."""
        try:
            self.wait(timeout)
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout)
            self.pool.clear()

    def _pop_unobserved(self) -> BaseException | None:
        # One failure per call: the others stay queued and are raised by the
        # next save or wait, so no failure is ever dropped.
        with self._lock:
            self._unobserved = [h for h in self._unobserved if not h._observed]
            if not self._unobserved:
                return None
            handle = self._unobserved.pop(0)
        handle._observed = True
        return handle.committed.exception()

    # -- writer thread ----------------------------------------------------------

    def _run(self) -> None:
        if self._writer_cores is not None:
            from torchaux.training.affinity import set_thread_affinity

            try:
                set_thread_affinity(self._writer_cores)
            except (ValueError, OSError) as exc:
                # Pinning is an optimisation: an unpinned writer still saves
                # correctly, so report the problem and keep serving saves.
                _log.warning("torchaux: could not pin the writer thread (%s); running unpinned", exc)
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        handle = job.handle
        error: BaseException | None = None
        result: str | None = None
        try:
            job.snapshot.finish_staging()
            handle.staged.set_result(None)
            result = job.write(job.snapshot)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            error = exc
        finally:
            job.snapshot.release(self.pool)
        with self._lock:
            self._pending.discard(handle)
            if error is not None:
                self._unobserved.append(handle)
        if error is None:
            handle.committed.set_result(result)
        else:
            if not handle.staged.done():
                handle.staged.set_exception(error)
            handle.committed.set_exception(error)
        # Release last: a caller that waited on `committed` and saves again
        # sees the failure bookkeeping above before it gets the slot.
        self._slots.release()


_default: AsyncSaver | None = None
_default_lock = threading.Lock()


def default_saver() -> AsyncSaver:
    """The process-wide saver used by :func:`torchaux.save_async`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = AsyncSaver()
        return _default


def wait_saves(timeout: float | None = None) -> None:
    """Wait for every pending save in the process; raise the first unobserved failure.

    Args:
        timeout: seconds to wait for each pending save (``None``: no limit).

    Raises:
        The original exception of the first failed save that nobody had
        observed through :meth:`SaveHandle.wait` or an earlier call.

    Example:
        >>> import torch, torchaux, os
        >>> h = torchaux.save_async(torch.ones(2), os.path.join(doctest_tmp, "w.pt"))
        >>> torchaux.wait_saves()
        >>> h.done()
        True
    """
    savers = list(_savers)
    for saver in savers:
        saver._wait_pending(timeout)
    for saver in savers:
        failure = saver._pop_unobserved()
        if failure is not None:
            raise failure  # any further failures stay queued for the next call


def _flush_at_exit() -> None:
    # Pending saves finish before the interpreter exits (torch_npu gets the same
    # effect from non-daemon threads); failures cannot be raised any more, so
    # each one is logged with its traceback.
    while True:
        try:
            wait_saves()
            return
        except BaseException as exc:  # noqa: BLE001 - reported, nothing left to raise to
            _log.error("torchaux: a checkpoint save failed and was never waited for", exc_info=exc)


atexit.register(_flush_at_exit)
