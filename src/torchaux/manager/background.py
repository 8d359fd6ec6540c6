"""The manager's background thread, and the failures nobody has seen yet.

Pointer updates, retention and - with a process group - publishing and the
ranks' verdicts run on one thread, in the order they were queued.  A task's
failure, or a save handle that failed without anyone waiting on it, is kept
until :meth:`BackgroundWork.raise_failure` raises it (the next ``save``,
``wait_until_finished`` or ``close``): errors of background saves are never
lost (orbax #605, ecosystem-anchors.md §3).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from torchaux.checkpoint.engine.saver import SaveHandle

__all__ = ["BackgroundWork", "chain"]


class BackgroundWork:
    """One worker thread running queued tasks; failures kept for the caller.

    Example:
        >>> work = BackgroundWork("doc")
        >>> work.put(lambda: 1 / 0)
        >>> work.drain(); work.has_failure()
        True
        >>> work.raise_failure()
        Traceback (most recent call last):
        ...
        ZeroDivisionError: division by zero
        >>> work.stop()
    """

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._handles: list[SaveHandle] = []
        self._errors: list[BaseException] = []
        self._tasks: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                task()
            except BaseException as exc:  # noqa: BLE001 - raised by the next save/wait/close
                with self._lock:
                    self._errors.append(exc)
            finally:
                self._tasks.task_done()

    def put(self, task: Callable[[], Any]) -> None:
        """Run ``task`` on the thread after the tasks queued before it."""
        self._tasks.put(task)

    def track(self, handle: SaveHandle) -> None:
        """Keep ``handle`` until its failure (if any) was seen; done and fine ones are dropped."""
        with self._lock:  # registered before it can fail, so no failure is dropped
            self._handles = [h for h in self._handles if _may_still_raise(h)] + [handle]

    def raise_failure(self) -> None:
        """Raise the oldest failure of a task or an unobserved handle, if any."""
        with self._lock:
            if self._errors:
                raise self._errors.pop(0)
            for handle in self._handles:
                if handle.done() and not handle._observed:
                    exc = handle.exception()
                    if exc is not None:
                        raise exc

    def has_failure(self) -> bool:
        """Whether :meth:`raise_failure` would raise now (nothing is marked seen)."""
        with self._lock:
            return bool(self._errors) or any(
                h.done() and not h._observed and h.committed.exception() is not None
                for h in self._handles
            )

    def drain(self) -> None:
        """Wait until every tracked save is done and every queued task ran."""
        with self._lock:
            handles = list(self._handles)
        for handle in handles:
            handle.committed.exception()  # the callbacks have run once this returns
        self._tasks.join()

    def stop(self) -> None:
        """Stop the thread once the queued tasks ran."""
        self._tasks.put(None)
        self._thread.join()


def _may_still_raise(handle: SaveHandle) -> bool:
    if not handle.done():
        return True
    return not handle._observed and handle.committed.exception() is not None


def chain(source: Future[Any], target: Future[Any]) -> None:
    """Resolve ``target`` as ``source`` resolves (unless it is resolved already)."""

    def copy(done: Future[Any]) -> None:
        exc = done.exception()
        if target.done():
            return
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
