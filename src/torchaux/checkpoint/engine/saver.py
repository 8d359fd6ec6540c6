"""Background writer: :class:`AsyncSaver` and the :class:`SaveHandle` it returns.

One saver owns one host buffer pool and one writer thread.  Saves are written
in submission order (two saves to one path can never race).  Back-pressure:
at most ``max_pending`` saves hold staging buffers at once (default one, knob
``TORCHAUX_MAX_PENDING_SAVES``); a new save waits in :meth:`AsyncSaver.reserve`.
Two kinds of save never wait there, because waiting could never end: a save
from a thread that is itself inside a save of this saver (a signal handler
that interrupted staging - the preemption pattern) and a save from the
writer thread (a done-callback).  They take one extra slot with their own
scratch buffers.

Failures are never lost and reported once.  A failed save's original
exception is raised by :meth:`SaveHandle.wait` / ``handle.committed.result()``
/ ``.exception()`` (each counts as observed), by :func:`wait_saves`, or - if
nobody looked at it - by the next save on the same saver.

Exit and fork: :mod:`.lifecycle`.  A saver dropped without :meth:`AsyncSaver.close`
is collected and its writer thread ends (the thread holds it only during a save).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from torchaux import _knobs
from torchaux.checkpoint.engine import lifecycle
from torchaux.checkpoint.engine.lifecycle import wait_saves
from torchaux.checkpoint.engine.handle import SaveHandle, deadlock_error, serving
from torchaux.checkpoint.engine.lifecycle import writer_loop
from torchaux.checkpoint.engine.pool import HostBufferPool
from torchaux.checkpoint.engine.staging import Snapshot
from torchaux.checkpoint.engine.staging.capture import buffer_requests
from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.errors import SaveClosedError

if TYPE_CHECKING:
    from torchaux.training.affinity import CoreRange

__all__ = ["AsyncSaver", "SaveHandle", "wait_saves", "default_saver"]

_log = logging.getLogger("torchaux")


@dataclass
class _Reservation:
    slot: bool  # holds one of the max_pending slots
    pool: HostBufferPool | None  # scratch buffers of an extra (never-waiting) save


@dataclass
class _Job:
    snapshot: Snapshot | None
    write: Callable[[Snapshot], str | None] | None
    handle: SaveHandle
    reservation: _Reservation


#: Opens the destination of a path save; yields a binary file and commits on
#: clean exit.  The default is :func:`torchaux.checkpoint.storage.commit.atomic_write`;
#: tests inject failing or gated sinks here.
Sink = Callable[[str], contextlib.AbstractContextManager[BinaryIO]]


def _stop_writer(box: dict[str, Any]) -> None:
    box["jobs"].put(None)  # the saver was collected: its writer thread ends


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
            the constructing (training) thread is *not* bound to.  ``None``
            (default) leaves the writer unpinned.

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
        # Imported here: torchaux.training imports the checkpoint engine (graph
        # dumps are written through it), so a module-level import would be circular.
        from torchaux.training.affinity import _parse, cores_excluding, get_thread_affinity

        if writer_cores == "spare":
            # No spare core (the trainer may use all of them): stay unpinned.
            writer_cores = cores_excluding(get_thread_affinity()) or None
        elif isinstance(writer_cores, str):
            raise ValueError(f"writer_cores must be a core range, 'spare' or None, got {writer_cores!r}")
        elif writer_cores is not None:
            _parse(writer_cores)  # ValueError now, not later on the writer thread
        self._pool = HostBufferPool()
        self.sink = sink
        self._limit = limit
        self._name = name
        self._writer_cores = writer_cores
        self._closed = False
        self._box: dict[str, Any] = {}
        self._fresh_state()
        weakref.finalize(self, _stop_writer, self._box).atexit = False
        lifecycle.register(self)

    def _fresh_state(self) -> None:
        self._slots = threading.BoundedSemaphore(self._limit)
        self._box["jobs"] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[_Job | None] = self._box["jobs"]
        # Guards starting the writer thread (RLock: a signal handler may save while
        # its thread holds it).  The writer never takes it while it runs, and the
        # bookkeeping below uses only operations that are atomic under the GIL, so
        # the writer can never wait on a caller (nor on a signal-interrupted one).
        self._lock = threading.RLock()
        self._pending: dict[SaveHandle, _Job] = {}
        self._unobserved: list[SaveHandle] = []
        self._reservations = threading.local()
        self._thread: threading.Thread | None = None

    # -- caller side ----------------------------------------------------------

    def _held(self) -> list[_Reservation]:
        held = getattr(self._reservations, "stack", None)
        if held is None:
            held = self._reservations.stack = []
        return held  # type: ignore[no-any-return]

    def _on_writer_thread(self) -> bool:
        return getattr(serving, "jobs", None) is self._jobs

    @property
    def pool(self) -> HostBufferPool:
        """The staging pool for the current thread's save (scratch for an extra save)."""
        held = self._held()
        if held and held[-1].pool is not None:
            return held[-1].pool
        return self._pool

    @pool.setter
    def pool(self, value: HostBufferPool) -> None:
        self._pool = value

    def reserve(self) -> None:
        """Wait for a free staging slot, then surface unobserved earlier failures.

        Call before staging; pair with :meth:`submit` (which keeps the slot) or
        :meth:`cancel_reservation`, on the same thread.  Raises the original
        exception of the oldest failed save that nobody observed.
        """
        if self._closed:
            raise SaveClosedError("this AsyncSaver is closed; create a new one to save again")
        held = self._held()
        if held or self._on_writer_thread():
            # Waiting here could never end (see the module docstring): take an extra slot.
            held.append(_Reservation(False, type(self._pool)()))
        else:
            # Pushed before waiting, so a signal handler running during the wait sees it.
            held.append(_Reservation(False, None))
            try:
                self._slots.acquire()
            except BaseException:
                held.pop()
                raise
            held[-1].slot = True
        failure = self._pop_unobserved()
        if failure is not None:
            self.cancel_reservation()
            raise failure

    def cancel_reservation(self) -> None:
        """Give back a slot taken by :meth:`reserve` without submitting."""
        held = self._held()
        if not held:
            raise RuntimeError("cancel_reservation() without a reserve() on this thread")
        self._give_back(held.pop())

    def release_unsubmitted(self) -> None:
        """After an interrupted :meth:`submit`: give back this thread's slot if submit never took it."""
        if held := self._held():
            self._give_back(held.pop())

    def _give_back(self, reservation: _Reservation) -> None:
        # Idempotent: an interrupted submit and the writer never both release a slot.
        pool, reservation.pool = reservation.pool, None
        if pool is not None:
            pool.clear()
        slot, reservation.slot = reservation.slot, False
        if slot:
            self._slots.release()

    def submit(
        self, snapshot: Snapshot, write: Callable[[Snapshot], str | None], target: str | None
    ) -> SaveHandle:
        """Queue ``write(snapshot)`` on the writer thread; returns its handle.

        An interrupt before the job is queued gives the slot back (a lost slot
        would block the next save forever: engine review ``o_kbint.py``).
        """
        held, reservation, handle, queued = self._held(), None, None, False
        try:
            reservation = held.pop() if held else _Reservation(False, None)
            handle = SaveHandle(target, self._jobs)
            job = _Job(snapshot, write, handle, reservation)
            self._pending[handle] = job
            if not self._start_writer():
                # No thread can be started (interpreter shutdown, cpython#113964): write here.
                queued = True  # the job owns the reservation from here on
                self._execute(job)
                return handle
            self._jobs.put(job); queued = True  # noqa: E702 - one line: no interrupt between
            return handle
        except BaseException:
            if not queued:
                self._pending.pop(handle, None)  # type: ignore[arg-type]
                if reservation is None and held:
                    reservation = held.pop()  # interrupted before taking it
                if reservation is not None:
                    self._give_back(reservation)
            raise

    def _start_writer(self) -> bool:
        if self._thread is not None and self._thread.is_alive():
            return True  # without the lock: the writer itself saves from callbacks
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return True
            thread = threading.Thread(
                target=writer_loop, args=(weakref.ref(self), self._jobs, self._writer_cores),
                name=self._name, daemon=True,
            )
            try:
                thread.start()
            except RuntimeError:
                return False
            self._thread = thread
            return True

    def prepare(self, obj: object) -> int:
        """Allocate and fault in the staging buffers a save of ``obj`` will use; return their bytes.

        Call it once before training (outside the timed loop): the first save
        then copies into warm memory, as every later one does, instead of
        paying the page faults of fresh memory on the training thread
        (docs/benchmarks.md §8).  The pool keeps the buffers while sizes stay
        the same.  The writer thread is started here too, so the first save
        does not start it (0.3 ms here).

        >>> import torch
        >>> saver = AsyncSaver()
        >>> saver.prepare({"w": torch.zeros(1 << 18)})
        1048576
        >>> saver.close()
        """
        if self._closed:
            raise SaveClosedError("this AsyncSaver is closed; prepare a new one before training")
        warmed = self._pool.warm(buffer_requests(obj))
        self._start_writer()
        return warmed

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
        pending = list(self._pending)
        if pending and self._on_writer_thread():
            raise deadlock_error("waiting for pending saves")
        for handle in pending:
            # Waits without marking the handle observed; a failure stays queued.
            Future.exception(handle.committed, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush pending saves, stop the writer thread and free the pool."""
        try:
            self.wait(timeout)
        finally:
            self._closed = True
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join(timeout)
            self._pool.clear()

    def _pop_unobserved(self) -> BaseException | None:
        # One failure per call: the others stay queued and are raised by the
        # next save or wait, so no failure is ever dropped.  list.pop is atomic,
        # so two threads never get the same failure.
        while True:
            try:
                handle = self._unobserved.pop(0)
            except IndexError:
                return None
            if not handle._observed:
                handle._observed = True
                return Future.exception(handle.committed)

    # -- writer thread ----------------------------------------------------------

    def _execute(self, job: _Job) -> None:
        handle = job.handle
        error: BaseException | None = None
        result: str | None = None
        try:
            assert job.snapshot is not None and job.write is not None
            job.snapshot.finish_staging()
            handle.staged.set_result(None)
            result = job.write(job.snapshot)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            error = exc
        finally:
            # Drop every per-save reference (the target file object, the write
            # closure, the snapshot) before anyone is told the save is done.
            snapshot, job.snapshot, job.write = job.snapshot, None, None
            if snapshot is not None:
                snapshot.release(job.reservation.pool or self._pool)
            del snapshot
        try:
            self._pending.pop(handle, None)
            if error is not None:
                self._unobserved.append(handle)
        finally:
            # The slot goes back before the futures resolve: a done-callback or a
            # waiter that saves again finds it free.
            self._give_back(job.reservation)
        if error is None:
            handle.committed.set_result(result)
        else:
            if not handle.staged.done():
                handle.staged.set_exception(error)
            handle.committed.set_exception(error)

    def _after_fork_in_child(self) -> None:
        # The parent's writer thread does not exist here and its locks may be
        # held by parent threads; pending saves belong to the parent.
        pending = list(self._pending.items())
        self._fresh_state()
        self._pool._after_fork_in_child()
        for handle, job in pending:
            lifecycle.orphan(handle, job.snapshot)

    def _exit_cleanup(self, deadline: float) -> None:
        """Release what outlives the threads at exit (a process saver stops its child)."""


_default: AsyncSaver | None = None
_default_lock = threading.RLock()  # RLock: a signal handler may save from inside default_saver()


def default_saver() -> AsyncSaver:
    """The process-wide saver used by :func:`torchaux.save_async`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = AsyncSaver()
        return _default


def _reset_default_lock() -> None:
    global _default_lock
    _default_lock = threading.RLock()  # a parent thread may have held it at fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_default_lock)
