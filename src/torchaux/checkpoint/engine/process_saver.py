"""``async_save="process"``: write checkpoints in a separate process.

Why: serialising, checksumming and encrypting run Python between the heavy
calls, and on a GIL-bound training loop even short GIL holds add up.  A
writer *process* has its own interpreter and GIL.

How, without pickling tensor bytes through a pipe: the staging buffers of a
:class:`ProcessSaver` live in POSIX shared memory (``/dev/shm``).  Staging is
unchanged (the caller copies live tensors into those buffers); the writer
thread then sends the child only the segment names, the pickled metadata and
a picklable write spec, and waits for its answer.  The child maps the same
segments, writes, fsyncs and renames the file, and reports success or the
original exception.

The child is ``python -m torchaux.checkpoint.engine.writer_process``
(:mod:`.writer_process`): a fresh interpreter that never imports the user's
``__main__`` (``multiprocessing``'s ``spawn`` would, re-running an unguarded
training script) and is never forked from a CUDA-initialised or
multi-threaded parent.  It is started once per saver and reused; it ends when
the saver is closed or collected, or at interpreter exit.  If it dies
mid-write, the parent removes its temp file and the next save starts a new
one.  Zero-byte buffers use no segment.  Linux only (``/dev/shm``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

import torchaux
from torchaux.checkpoint.engine.pool import HostBufferPool
from torchaux.checkpoint.engine.writer_process import Job
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.engine.staging import Snapshot
from torchaux.checkpoint.storage.commit import remove_stale_temps

__all__ = ["ProcessSaver", "default_process_saver"]


class SharedHostBufferPool(HostBufferPool):
    """Host buffers in named shared memory segments, reused and bounded like the base pool."""

    def __init__(self, cache_bytes: int | None = None) -> None:
        super().__init__(cache_bytes)
        self._segments: dict[int, SharedMemory] = {}  # data_ptr -> segment (non-empty buffers only)

    def _key(self, buf: torch.UntypedStorage) -> tuple[int, bool]:
        return (buf.nbytes(), False)  # pinning does not apply to segments

    def acquire_many(self, requests: Sequence[tuple[int, bool]]) -> list[torch.UntypedStorage]:
        return super().acquire_many([(nbytes, False) for nbytes, _ in requests])

    def _allocate(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        if nbytes == 0:
            return torch.UntypedStorage(0)  # nothing to share: no segment to leak
        shm = SharedMemory(create=True, size=nbytes)
        storage = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes).untyped_storage()
        self._segments[storage.data_ptr()] = shm
        return storage

    def _discard(self, buffers: list[torch.UntypedStorage]) -> None:
        segments = [self._segments.pop(b.data_ptr(), None) for b in buffers if b.nbytes()]
        buffers.clear()  # the last references: the segments' memory is no longer exported
        for shm in segments:
            if shm is not None:
                shm.close()
                shm.unlink()

    def segment_name(self, storage: torch.UntypedStorage) -> str | None:
        """Name of the segment behind ``storage`` (None for an empty buffer)."""
        shm = self._segments.get(storage.data_ptr()) if storage.nbytes() else None
        return shm.name if shm is not None else None

    def _after_fork_in_child(self) -> None:
        # The segments belong to the parent: forget them without unlinking, and
        # never hand their (shared!) memory to a save of the child.
        super()._after_fork_in_child()
        self._segments = {}


class _Process(subprocess.Popen):  # type: ignore[type-arg]
    """The child, with ``multiprocessing.Process``'s ``is_alive`` / ``join`` spelling."""

    def is_alive(self) -> bool:
        return self.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout)


class _Child:
    """The writer process and its connection (shared with the saver's finalizer)."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.proc: _Process | None = None
        self.lock = threading.Lock()

    def connection(self) -> tuple[Connection, int]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.forget()
                ours, theirs = socket.socketpair()
                src = os.path.dirname(os.path.dirname(torchaux.__file__))
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
                try:
                    self.proc = _Process(
                        [sys.executable, "-m", "torchaux.checkpoint.engine.writer_process",
                         str(theirs.fileno())],
                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
                    )
                finally:
                    theirs.close()
                self.conn = Connection(ours.detach())
                self.conn.send(list(sys.path))
            assert self.conn is not None and self.proc is not None
            return self.conn, self.proc.pid

    def forget(self) -> None:
        """Kill and reap the child (it is dead or unusable)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float | None) -> None:
        """Ask the child to finish and wait for it (killing it after ``timeout``)."""
        with self.lock:
            if self.conn is not None:
                # A dead child cannot be asked to stop; it is reaped below.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                    self.conn.send(None)
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
            self.forget()

    def after_fork_in_child(self) -> None:
        # The parent's child and socket are not ours: close our copy of the fd only.
        self.lock = threading.Lock()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        self.conn = None
        self.proc = None


def _finalize(child: _Child, pool: SharedHostBufferPool) -> None:
    # The saver was collected without close(): stop its child, unlink its segments.
    child.stop(timeout=5.0)
    pool.clear()


class ProcessSaver(AsyncSaver):
    """An :class:`AsyncSaver` whose writes run in a child process.

    Example:
        >>> import os, torch, torchaux
        >>> saver = ProcessSaver()
        >>> path = os.path.join(doctest_tmp, "p.ckpt")
        >>> h = torchaux.save_checkpoint({"w": torch.ones(2)}, path, async_save="process",
        ...                              saver=saver)
        >>> h.wait() == path
        True
        >>> saver.close()
    """

    def __init__(self, *, max_pending: int | None = None, name: str = "torchaux-process-writer") -> None:
        super().__init__(max_pending=max_pending, name=name)
        self.pool = SharedHostBufferPool()
        self._child = _Child()
        weakref.finalize(self, _finalize, self._child, self._pool).atexit = False

    # The child's process, connection and lock (tests kill the child and hold the lock).
    @property
    def _proc(self) -> _Process | None:
        return self._child.proc

    @_proc.setter
    def _proc(self, value: _Process | None) -> None:
        self._child.proc = value

    @property
    def _conn(self) -> Connection | None:
        return self._child.conn

    @_conn.setter
    def _conn(self, value: Connection | None) -> None:
        self._child.conn = value

    @property
    def _proc_lock(self) -> threading.Lock:
        return self._child.lock

    def submit(self, snapshot: Snapshot, write: Callable[[Snapshot], Any], target: str | None) -> SaveHandle:
        pool = self.pool  # the scratch pool of an extra save, or the saver's own
        assert isinstance(pool, SharedHostBufferPool)
        child = self._child

        def in_child(snap: Snapshot) -> Any:
            job = Job(
                write, snap.pickled,
                [(key, pool.segment_name(s), s.nbytes()) for key, s in snap.records()],
                snap.tensor_index,
            )
            conn, pid = child.connection()
            try:
                conn.send(job)
                status, value = conn.recv()
            except (EOFError, OSError) as exc:  # BrokenPipe/ConnectionReset: child is gone
                with child.lock:
                    child.forget()  # reaped: the next save starts a fresh one
                if target is not None:
                    # Its temp file is ours to remove: the child cannot any more.
                    remove_stale_temps(os.path.dirname(os.path.abspath(target)), pid=pid)
                raise RuntimeError(
                    "the checkpoint writer process died (killed, or out of memory) before "
                    "finishing; the previous file at the target is intact and its temp file "
                    "was removed; the next save starts a new writer process"
                ) from exc
            if status == "error":
                raise value
            return value

        return super().submit(snapshot, in_child, target)

    def close(self, timeout: float | None = None) -> None:
        try:
            super().close(timeout)
        finally:
            self._child.stop(timeout)

    def _exit_cleanup(self, deadline: float) -> None:
        self._child.stop(max(0.0, deadline - time.monotonic()))
        self._pool.clear()

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        self._child.after_fork_in_child()


_default: ProcessSaver | None = None
_default_lock = threading.Lock()


def default_process_saver() -> ProcessSaver:
    """The process-wide saver behind ``async_save="process"``."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ProcessSaver()
        return _default
