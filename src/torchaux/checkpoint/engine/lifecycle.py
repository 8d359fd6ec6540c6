"""Every live saver: :func:`wait_saves`, interpreter exit and ``os.fork()`` (docs/ENGINE.md).

Exit: pending saves are flushed for at most ``TORCHAUX_EXIT_FLUSH_TIMEOUT_S``
seconds in total (default 600; 0: do not wait), then abandoned with an ERROR
log naming their targets (the previous file at each target is intact; a temp
file may remain, which :func:`~torchaux.checkpoint.storage.commit.remove_stale_temps`
deletes).  Ctrl-C during the flush abandons it at once.  Failures found are
logged at ERROR level with their tracebacks: nothing can be raised any more.
The flush runs first in ``threading``'s exit hook - before non-daemon threads
are joined and before Python refuses to start threads (it does in atexit
handlers from 3.12 on, cpython#113964) - and again from ``atexit`` for saves
that atexit handlers made later, within the same time budget.

Fork: the child's savers start afresh (new writer thread on first use, new
locks, empty pools); saves pending in the parent fail in the child with a
:class:`~torchaux.errors.CheckpointError` (the parent writes them).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING, Any

from torchaux import _knobs
from torchaux.checkpoint.cpu_time import counted
from torchaux.checkpoint.engine.handle import serving
from torchaux.errors import CheckpointError

if TYPE_CHECKING:
    from torchaux.checkpoint.engine.saver import AsyncSaver

__all__ = ["register", "savers", "orphan", "wait_saves"]

_log = logging.getLogger("torchaux")
_savers: weakref.WeakSet[Any] = weakref.WeakSet()


def register(saver: Any) -> None:
    """Track ``saver`` (weakly) for :func:`~torchaux.wait_saves`, the exit flush and fork."""
    _savers.add(saver)


def savers() -> list[Any]:
    """Every live saver, in no particular order."""
    return list(_savers)


_exit_deadline: list[float] = []  # set by the first exit pass: the budget is shared
_abandoned: weakref.WeakSet[Any] = weakref.WeakSet()  # handles already reported as abandoned


def wait_saves(timeout: float | None = None) -> None:
    """Wait for every pending save in the process; raise the first unobserved failure.

    Args:
        timeout: seconds to wait for each pending save (``None``: no limit).

    Raises:
        The original exception of the first failed save that nobody had
        observed through its handle or an earlier call.

    Example:
        >>> import torch, torchaux, os
        >>> h = torchaux.save_async(torch.ones(2), os.path.join(doctest_tmp, "w.pt"))
        >>> torchaux.wait_saves()
        >>> h.done()
        True
    """
    savers_now = savers()
    for saver in savers_now:
        saver._wait_pending(timeout)
    for saver in savers_now:
        failure = saver._pop_unobserved()
        if failure is not None:
            raise failure  # any further failures stay queued for the next call


def orphan(handle: Any, snapshot: Any) -> None:
    """In a forked child: fail ``handle`` (the parent writes that save) and free its fences."""
    if snapshot is not None:
        # Nobody stages it here: a model= fence in the child must not wait for it.
        snapshot._buffers_ready = threading.Event()
        snapshot._all_ready = threading.Event()
        snapshot._buffers_ready.set()
        snapshot._all_ready.set()
    gone = CheckpointError(
        "this save was pending in the parent when the process forked; the parent writes "
        "it and reports its outcome; the forked child cannot wait for it"
    )
    for fut in (handle.staged, handle.committed):
        # Parent threads may have held these locks; callbacks may take others.
        fut._condition = threading.Condition()
        fut._done_callbacks = []
        if not fut.done():
            fut.set_exception(gone)
    handle._observed = True


def _still_pending(saver: Any, deadline: float) -> list[Any]:
    left = []
    for handle in list(saver._pending):
        try:
            Future.exception(handle.committed, max(0.0, deadline - time.monotonic()))
        except FutureTimeoutError:
            left.append(handle)
    return left


def _flush_at_exit() -> None:
    # Pending saves finish before the interpreter exits, for a bounded time;
    # failures cannot be raised any more, so each one is logged with its traceback.
    timeout = _knobs.exit_flush_timeout_s()
    if not _exit_deadline:
        _exit_deadline.append(time.monotonic() + timeout)
    deadline = _exit_deadline[0]
    savers_now = savers()
    try:
        left = [h for s in savers_now for h in _still_pending(s, deadline)]
    except KeyboardInterrupt:
        _exit_deadline[0] = 0.0  # the user wants out: later passes do not wait either
        left = [h for s in savers_now for h in s._pending if not h.done()]
        _abandoned.update(left)
        _log.error(
            "torchaux: exit flush interrupted (Ctrl-C); abandoning %d pending save(s) to %s; "
            "the previous file at each target is intact", len(left), [h.target for h in left],
        )
    else:
        left = [h for h in left if h not in _abandoned]  # each reported once
        _abandoned.update(left)
        if left:
            _log.error(
                "torchaux: %d save(s) to %s still pending after the %d s exit flush timeout "
                "(TORCHAUX_EXIT_FLUSH_TIMEOUT_S); abandoned: the previous file at each target "
                "is intact, a temp file may remain (remove_stale_temps)",
                len(left), [h.target for h in left], timeout,
            )
    for saver in savers_now:
        while (failure := saver._pop_unobserved()) is not None:
            _log.error("torchaux: a checkpoint save failed and was never waited for", exc_info=failure)
        saver._exit_cleanup(deadline)


def _after_fork_in_child() -> None:
    for saver in savers():
        saver._after_fork_in_child()


# threading's exit hook runs before non-daemon threads are joined and before the
# interpreter refuses new threads (which Python >= 3.12 does in atexit handlers,
# cpython#113964); the atexit pass catches saves made later, by atexit handlers.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_flush_at_exit)
atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def writer_loop(
    ref: weakref.ReferenceType[AsyncSaver], jobs: queue.SimpleQueue[Any], cores: Any
) -> None:
    """The writer thread of one saver: run its jobs, trim its pool when idle, end on ``None``.

    Holds the saver only while a job runs, so a dropped saver can be collected
    (with this thread, which then ends).
    """
    serving.jobs = jobs
    if cores is not None:
        from torchaux.training.affinity import set_thread_affinity

        try:
            set_thread_affinity(cores)
        except (ValueError, OSError) as exc:
            # Pinning is an optimisation: an unpinned writer still saves
            # correctly, so report the problem and keep serving saves.
            _log.warning("torchaux: could not pin the writer thread (%s); running unpinned", exc)
    trimmed = True
    while True:
        idle = _knobs.pool_idle_trim_s()
        try:
            job = jobs.get() if trimmed or idle <= 0 else jobs.get(timeout=idle)
        except queue.Empty:
            saver = ref()
            trimmed = saver is None or saver._pool.trim(blocking=False)
            del saver
            continue
        if job is None:
            return
        saver = ref()
        if saver is None:
            return
        with counted():
            saver._execute(job)
        trimmed = False
        del saver, job
