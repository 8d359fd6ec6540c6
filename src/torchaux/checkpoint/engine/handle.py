"""The handle of one asynchronous save: :class:`SaveHandle` and its two futures.

Both futures are created running, so ``cancel()`` returns False: a save that
has reached the writer cannot be abandoned half-way, and the writer can never
find its future cancelled under it.  ``committed.result()`` and
``committed.exception()`` count as observing a failure (the next save does not
raise it again); so do :meth:`SaveHandle.wait` and :meth:`SaveHandle.exception`.
A wait on the saver's own writer thread (from a done-callback) for a save not
yet done raises :class:`~torchaux.errors.CheckpointError` instead of hanging.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

from torchaux.errors import CheckpointError

__all__ = ["SaveHandle"]

#: The queue a writer thread serves (set on that thread), so a wait there is
#: refused instead of deadlocking.
serving = threading.local()


def deadlock_error(what: str) -> CheckpointError:
    return CheckpointError(
        f"{what} on the saver's own writer thread (from a done-callback) would wait forever: "
        "that thread writes the save; wait from another thread, or only start saves in the callback"
    )


class _HandleFuture(Future):  # type: ignore[type-arg]
    """A future that cannot be cancelled and remembers that its failure was looked at.

    ``jobs`` is the queue of the saver that resolves it; a handle made by other
    code (``jobs=None``, e.g. a manager wrapping saves) is a plain container whose
    owner tracks observation, so peeking at it does not count.
    """

    def __init__(self, jobs: object) -> None:
        super().__init__()
        self._jobs = jobs
        self._observed = False
        self.set_running_or_notify_cancel()  # RUNNING: cancel() now returns False

    def _check_thread(self, timeout: float | None) -> None:
        if (
            self._jobs is not None and not self.done() and timeout != 0
            and getattr(serving, "jobs", None) is self._jobs
        ):
            raise deadlock_error("waiting for a save")

    def result(self, timeout: float | None = None) -> Any:
        self._check_thread(timeout)
        try:
            return super().result(timeout)
        except BaseException as exc:
            # A timeout leaves a still-pending failure unobserved; a failure raised is observed.
            if self._jobs is not None and self.done() and Future.exception(self, 0) is exc:
                self._observed = True
            raise
        finally:
            if self._jobs is not None and self.done() and Future.exception(self, 0) is None:
                self._observed = True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._check_thread(timeout)
        exc = super().exception(timeout)  # TimeoutError leaves it unobserved
        if self._jobs is not None:
            self._observed = True
        return exc

    def _invoke_callbacks(self) -> None:
        super()._invoke_callbacks()  # type: ignore[misc]
        # Callbacks hold whatever they closed over (a model, a snapshot): drop them now.
        self._done_callbacks = []


class SaveHandle:
    """The two phases of one asynchronous save.

    Attributes:
        staged: resolves (to ``None``) once the snapshot is fully on the host;
            from then on nothing the caller does can change the file.
        committed: resolves to the file path (or ``None`` for a file object)
            once the file is complete, renamed into place and fsynced.
            Neither future can be cancelled; ``committed.result()`` and
            ``committed.exception()`` count as observing a failure.
    """

    def __init__(self, target: str | None, jobs: object = None) -> None:
        self.target = target
        self.staged: Future[None] = _HandleFuture(jobs)
        self.committed: Future[str | None] = _HandleFuture(jobs)

    @property
    def _observed(self) -> bool:
        return self.committed._observed  # type: ignore[attr-defined, no-any-return]

    @_observed.setter
    def _observed(self, value: bool) -> None:
        self.committed._observed = value  # type: ignore[attr-defined]

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until committed; re-raise the save's original exception if it failed.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            CheckpointError: called on the saver's writer thread before the save is done.
        """
        try:
            result = self.committed.result(timeout)
        except FutureTimeoutError:
            if not self.committed.done():
                raise  # still pending: a later failure must still be reported
            self._observed = True
            raise
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
            state = "failed" if Future.exception(self.committed) is not None else "committed"
        elif self.staged.done():
            state = "staged"
        return f"SaveHandle(target={self.target!r}, {state})"
