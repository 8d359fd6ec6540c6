"""Fault-injection sinks for :class:`torchaux.AsyncSaver` (the ``sink=`` seam).

A sink is ``sink(path)`` -> context manager yielding a binary file that is
committed on clean exit.  These wrap the real
:func:`torchaux.checkpoint.storage.commit.atomic_write` so everything except the
injected fault is the production code path.
"""

from __future__ import annotations

import contextlib
import errno
import pathlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from typing import Any, BinaryIO

from torchaux.checkpoint.storage.commit import atomic_write

#: Upper bound for any wait in a test helper; a hang becomes a clear failure.
WAIT_S = 60.0


class _FailingFile:
    """Passes writes through until ``limit`` bytes, then raises (and keeps raising)."""

    def __init__(self, inner: BinaryIO, owner: FailingSink) -> None:
        self._inner = inner
        self._owner = owner
        self.written = 0
        self.failed = False

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        room = self._owner.fail_after - self.written
        if self.failed or len(view) > room:
            if not self.failed and room > 0:
                # A partial write first, like a disk that fills up mid-record.
                self._inner.write(view[:room])
                self.written += room
            self.failed = True
            exc = self._owner.make_error()
            self._owner.raised.append(exc)
            raise exc
        self._inner.write(view)
        self.written += len(view)
        return len(view)

    def flush(self) -> None:
        self._inner.flush()


class FailingSink:
    """Sink whose first ``failures`` saves fail with an ``OSError`` after ``fail_after`` bytes.

    Later saves go through ``atomic_write`` untouched.  ``raised`` holds every
    exception object the sink raised, so tests can check identity.
    """

    def __init__(
        self,
        fail_after: int = 100,
        *,
        failures: int = 1,
        make_error: Callable[[], BaseException] | None = None,
    ) -> None:
        self.fail_after = fail_after
        self.failures = failures
        self.make_error = make_error or (
            lambda: OSError(errno.ENOSPC, "No space left on device (injected by FailingSink)")
        )
        self.raised: list[BaseException] = []
        self.opened = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        with self._lock:
            self.opened += 1
            fail = self.opened <= self.failures
        with atomic_write(path) as f:
            if not fail:
                yield f
                return
            yield _FailingFile(f, self)  # type: ignore[misc]


class GatedSink:
    """Sink that blocks every save inside the sink until :meth:`release`.

    ``entered`` is set when a save reaches the sink (the writer thread is then
    busy with it); ``opened`` lists the paths in the order they were opened;
    ``committed`` lists them in the order their commit finished.
    """

    def __init__(self, inner: Callable[[str], contextlib.AbstractContextManager[BinaryIO]] = atomic_write) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.opened: list[str] = []
        self.committed: list[str] = []

    def release(self) -> None:
        """Open the gate for this and every later save."""
        self.gate.set()

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        self.opened.append(path)
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("GatedSink: the test never released the gate")
        with self.inner(path) as f:
            yield f
        self.committed.append(path)


class RecordingSink:
    """Sink that runs ``after_commit(path)`` once each commit is complete (on the writer thread)."""

    def __init__(self, after_commit: Callable[[str], None]) -> None:
        self.after_commit = after_commit

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        with atomic_write(path) as f:
            yield f
        self.after_commit(path)


#: How long a test waits to conclude that a call is (still) blocked.  A wrong
#: "blocked" verdict needs the call to take longer than this on its own,
#: which a non-blocking call never does; it never makes a test pass wrongly.
BLOCKED_S = 0.2


def background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a daemon thread; its outcome lands in the returned future."""
    fut: Future[Any] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the test through the future
            fut.set_exception(exc)

    threading.Thread(target=run, name=f"test-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return fut


def still_running(fut: Future[Any], seconds: float = BLOCKED_S) -> bool:
    """True if ``fut`` has not finished after ``seconds`` (the call is blocked)."""
    return not futures_wait([fut], timeout=seconds).done


def busy_writer(
    make_saver: Callable[..., Any], tmp_path: pathlib.Path
) -> tuple[Any, GatedSink, Any]:
    """A saver (max_pending=2) whose writer thread is stuck in a first, gated save.

    Returns ``(saver, sink, blocker handle)``; ``sink.release()`` lets it go on.
    """
    import torch

    import torchaux

    sink = GatedSink()
    saver = make_saver(sink=sink, max_pending=2)
    blocker = torchaux.save_async({"x": torch.zeros(1)}, tmp_path / "blocker.pt", saver=saver)
    assert sink.entered.wait(WAIT_S)
    return saver, sink, blocker
