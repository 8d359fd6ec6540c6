"""The background writer of tensor dumps: the caller only copies the tensor and enqueues it.

A dump is small and frequent (one per layer, per step), so what it costs the
calling thread matters more than what it costs the disk.  ``save_async`` on
the caller would pickle the tensor and stage it there (about 0.6–1 ms per
small dump, more than a ``torch.save`` of it: the training-review issue's
g3 measurement); here the caller makes one host copy (the snapshot of the
value) and appends it to a bounded queue, and a drain thread hands each copy
to the engine (``save_async`` on this saver: staging, atomic write, fsync).
The drain starts once no dump has come for ``TORCHAUX_DUMP_IDLE_MS`` (a
burst of per-layer dumps is not slowed by a writer competing for the GIL:
measured 197 µs per 1 KB dump with an eager drain, 26 µs without), when the
queue holds ``TORCHAUX_DUMP_QUEUE_BYTES``, or when someone waits.

Failures are never lost: a dump the drain thread could not hand over, and
any failure of the writes themselves, is raised by :func:`torchaux.wait_saves`,
by :meth:`_DumpSaver.wait`, or by the next dump.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from typing import Any

import torch

from torchaux import _knobs
from torchaux.checkpoint.api import save_async
from torchaux.checkpoint.engine.saver import AsyncSaver
from torchaux.training.graph_dump import cuda as graph_dump_cuda

__all__ = ["QUEUE_DEPTH"]

#: Dumps the engine saver may hold (staged and being written) at once.
QUEUE_DEPTH = 64

_instances: weakref.WeakSet[_DumpSaver] = weakref.WeakSet()


class _DumpSaver(AsyncSaver):
    """The writer of every dump, with a queue in front of the engine.

    :func:`torchaux.wait_saves` and :meth:`wait` first wait for the queue to
    drain, then let queued CUDA graph replays run their dump callbacks (whose
    writes would otherwise not be pending yet), then wait for the writes; a
    failed hand-over or callback counts as a failure.

    Example:
        >>> import os, torch
        >>> saver = _DumpSaver(max_pending=4)
        >>> saver.enqueue(torch.ones(2), os.path.join(doctest_tmp, "d.pt"))
        >>> saver.wait(); saver.close()
        >>> torch.load(os.path.join(doctest_tmp, "d.pt"))
        tensor([1., 1.])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: deque[tuple[torch.Tensor, str]] = deque()
        self._cond = threading.Condition()
        self._busy = 0  # items taken by the drain thread and not yet handed over
        self._queued_bytes = 0
        self._last_enqueue = 0.0
        self._flush = 0  # waiters asking the drain to start now
        self._drain: threading.Thread | None = None
        self._stopping = False
        self._handover_failures: list[BaseException] = []
        # Copies already handed over, kept warm for the next dump of that shape
        # (a fresh 1 MiB copy costs a page fault per 4 KiB: ~0.6 ms here).
        self._spares: dict[tuple[torch.Size, torch.dtype], list[torch.Tensor]] = {}
        _instances.add(self)

    def snapshot(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous host copy of a CPU ``tensor``, in a warm spare buffer when one fits."""
        with self._cond:
            free = self._spares.get((tensor.shape, tensor.dtype))
            spare = free.pop() if free else None
        if spare is None:
            return tensor.clone(memory_format=torch.contiguous_format)
        return spare.copy_(tensor)

    def _keep_spare(self, snapshot: torch.Tensor) -> None:
        # Called once save_async has staged the copy (eager staging copies at
        # the call), so nothing reads it any more.  At most one spare per shape
        # and the queue's byte bound in all.
        nbytes = snapshot.numel() * snapshot.element_size()
        with self._cond:
            held = sum(s[0].numel() * s[0].element_size() for s in self._spares.values() if s)
            free = self._spares.setdefault((snapshot.shape, snapshot.dtype), [])
            if not free and held + nbytes <= _knobs.dump_queue_bytes() and snapshot.is_contiguous():
                free.append(snapshot)

    def enqueue(self, snapshot: torch.Tensor, path: str) -> None:
        """Queue ``snapshot`` (a host copy the caller no longer touches) to be saved at ``path``.

        Raises:
            Exception: the unobserved failure of an earlier dump.
        """
        failure = self._pop_unobserved()
        if failure is not None:
            raise failure
        nbytes = snapshot.numel() * snapshot.element_size()
        with self._cond:
            while self._queue and self._queued_bytes + nbytes > _knobs.dump_queue_bytes():
                self._cond.notify_all()  # full: the drain starts at once
                self._cond.wait()
            self._queue.append((snapshot, path))
            self._queued_bytes += nbytes
            self._last_enqueue = time.monotonic()
            self._cond.notify_all()
            if self._drain is None:
                thread = threading.Thread(target=self._run_drain, name="torchaux-dump-queue",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # at interpreter exit no thread may start: write inline
                    self._queue.pop()
                    self._hand_over(snapshot, path)
                    return
                self._drain = thread

    def _ready(self) -> float | None:
        """Seconds to wait before draining (0: now); None: nothing queued."""
        if not self._queue:
            return None
        if self._flush or self._stopping or self._queued_bytes >= _knobs.dump_queue_bytes():
            return 0.0
        return max(0.0, self._last_enqueue + _knobs.dump_idle_ms() / 1000 - time.monotonic())

    def _run_drain(self) -> None:
        while True:
            with self._cond:
                while (delay := self._ready()) != 0.0:
                    if delay is None and self._stopping:
                        return
                    self._cond.wait(delay)
                snapshot, path = self._queue.popleft()
                self._queued_bytes -= snapshot.numel() * snapshot.element_size()
                self._busy += 1
                self._cond.notify_all()
            try:
                self._hand_over(snapshot, path)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _hand_over(self, snapshot: torch.Tensor, path: str) -> None:
        # Move the writer's unobserved failures aside first: save_async would
        # raise one instead of saving this dump, and the dump would be lost.
        while (earlier := AsyncSaver._pop_unobserved(self)) is not None:
            self._handover_failures.append(earlier)
        try:
            save_async(snapshot, path, saver=self)
        except BaseException as exc:  # noqa: BLE001 - reported by the next wait or dump
            self._handover_failures.append(exc)
        else:
            self._keep_spare(snapshot)

    def _wait_pending(self, timeout: float | None) -> None:
        # Replays already queued on a GPU run their dumps' host callbacks only
        # when the device gets there, and each callback enqueues a dump here:
        # synchronize first, then drain what they queued.  (In the other order
        # wait_saves returned before any replay's file was written; seen on an
        # H200, docs/benchmarks.md "GPU".)
        graph_dump_cuda.synchronize_recorded_devices()
        with self._cond:
            self._flush += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: not self._queue and not self._busy, timeout):
                    raise TimeoutError(
                        f"{len(self._queue) + self._busy} tensor dumps still queued after {timeout} s"
                    )
            finally:
                self._flush -= 1
        super()._wait_pending(timeout)

    def _pop_unobserved(self) -> BaseException | None:
        if self._handover_failures:
            return self._handover_failures.pop(0)
        failure = super()._pop_unobserved()
        return failure if failure is not None else graph_dump_cuda.pop_failure()

    def close(self, timeout: float | None = None) -> None:
        """Drain the queue, stop the drain thread, then close the engine saver."""
        try:
            super().close(timeout)
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            drain, self._drain = self._drain, None
            if drain is not None and drain is not threading.current_thread():
                drain.join(timeout)


def _after_fork_in_child() -> None:
    # The parent's drain thread writes the parent's queued dumps; the child
    # must not write them a second time, and starts a drain thread of its own.
    for saver in list(_instances):
        saver._cond = threading.Condition()
        saver._queue.clear()
        saver._busy = saver._queued_bytes = saver._flush = 0
        saver._drain = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
