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
original exception.  The child is started with ``spawn`` (never ``fork``: a
forked child of a CUDA-initialised or multi-threaded parent can deadlock), once
per saver, and reused; it ends when the saver is closed or the interpreter
exits.  Linux only (it maps segments through ``/dev/shm``).
"""

from __future__ import annotations

import atexit
import logging
import contextlib
import mmap
import multiprocessing as mp
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.engine.staging import HostBufferPool, Snapshot, TensorLocation

__all__ = ["ProcessSaver", "default_process_saver"]

_SHM_DIR = "/dev/shm"


class SharedHostBufferPool(HostBufferPool):
    """Host buffers in named shared memory segments, reused like the base pool."""

    def __init__(self) -> None:
        super().__init__()
        self._segments: dict[int, SharedMemory] = {}  # data_ptr -> segment

    def acquire(self, nbytes: int, *, pinned: bool) -> torch.UntypedStorage:
        with self._lock:
            free = self._free.get((nbytes, False))
            if free:
                return free.pop()
        # A zero-byte segment cannot be created; one spare byte is never written.
        shm = SharedMemory(create=True, size=max(nbytes, 1))
        storage = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes).untyped_storage() \
            if nbytes else torch.UntypedStorage(0)
        with self._lock:
            self._segments[storage.data_ptr()] = shm
        return storage

    def release(self, buffers: Iterable[torch.UntypedStorage]) -> None:
        with self._lock:
            for buf in buffers:
                self._free[(buf.nbytes(), False)].append(buf)

    def segment_name(self, storage: torch.UntypedStorage) -> str | None:
        """Name of the segment behind ``storage`` (None for an empty buffer)."""
        shm = self._segments.get(storage.data_ptr()) if storage.nbytes() else None
        return shm.name if shm is not None else None

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            segments, self._segments = self._segments, {}
        for shm in segments.values():
            shm.close()
            shm.unlink()


@dataclass
class _Job:
    write: Callable[[Snapshot], Any]
    pickled: bytes
    records: list[tuple[str, str | None, int]]  # key, segment name, nbytes
    tensor_index: dict[str, TensorLocation]


class _MappedSnapshot(Snapshot):
    """A snapshot whose buffers are shared-memory segments mapped in the child."""

    @classmethod
    def open(cls, job: _Job) -> tuple[_MappedSnapshot, list[mmap.mmap]]:
        from torchaux.checkpoint.engine.staging import _Record

        maps, records = [], []
        for key, name, nbytes in job.records:
            if name is None:
                storage = torch.UntypedStorage(0)
            else:
                fd = os.open(os.path.join(_SHM_DIR, name.lstrip("/")), os.O_RDWR)
                try:
                    mm = mmap.mmap(fd, max(nbytes, 1))
                finally:
                    os.close(fd)
                maps.append(mm)
                storage = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes).untyped_storage()
            records.append(_Record(key, None, storage, False))
        snap = cls(job.pickled, records, tensor_index=job.tensor_index)
        snap._all_ready.set()
        return snap, maps


def _child_main(conn: Connection) -> None:
    # Runs in the spawned writer process: one job at a time, answers in order.
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            snap, maps = _MappedSnapshot.open(job)
            try:
                conn.send(("ok", job.write(snap)))
            finally:
                snap._records = []
                for mm in maps:
                    mm.close()
        except BaseException as exc:  # noqa: BLE001 - sent back to the parent, re-raised there
            try:
                conn.send(("error", exc))
            except Exception:  # noqa: BLE001 - the exception itself would not pickle
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


class ProcessSaver(AsyncSaver):
    """An :class:`AsyncSaver` whose writes run in a spawned child process.

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
        self._conn: Connection | None = None
        self._proc: Any = None
        self._proc_lock = threading.Lock()
        _process_savers.add(self)

    def _child(self) -> Connection:
        with self._proc_lock:
            if self._proc is None or not self._proc.is_alive():
                ctx = mp.get_context("spawn")
                parent, child = ctx.Pipe()
                self._proc = ctx.Process(target=_child_main, args=(child,), daemon=True,
                                         name="torchaux-writer-process")
                self._proc.start()
                child.close()
                self._conn = parent
            assert self._conn is not None
            return self._conn

    def submit(self, snapshot: Snapshot, write: Callable[[Snapshot], Any], target: str | None) -> SaveHandle:
        pool = self.pool
        assert isinstance(pool, SharedHostBufferPool)

        def in_child(snap: Snapshot) -> Any:
            job = _Job(
                write, snap.pickled,
                [(key, pool.segment_name(s), s.nbytes()) for key, s in snap.records()],
                snap.tensor_index,
            )
            conn = self._child()
            try:
                conn.send(job)
                status, value = conn.recv()
            except (EOFError, OSError) as exc:  # BrokenPipe/ConnectionReset: child is gone
                self._forget_child()  # the next save starts a fresh one
                raise RuntimeError(
                    "the checkpoint writer process died (killed, or out of memory) before "
                    "finishing; the previous file at the target is intact; the next save "
                    "starts a new writer process"
                ) from exc
            if status == "error":
                raise value
            return value

        return super().submit(snapshot, in_child, target)

    def _forget_child(self) -> None:
        with self._proc_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._proc is not None:
                self._proc.kill()
                self._proc.join()
                self._proc = None

    def close(self, timeout: float | None = None) -> None:
        try:
            super().close(timeout)
        finally:
            with self._proc_lock:
                if self._conn is not None:
                    # A dead child cannot be asked to stop; it is reaped below.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                        self._conn.send(None)
                    self._conn.close()
                    self._conn = None
                if self._proc is not None:
                    self._proc.join(timeout)
                    self._proc = None


_process_savers: weakref.WeakSet[ProcessSaver] = weakref.WeakSet()
_default: ProcessSaver | None = None
_default_lock = threading.Lock()


def default_process_saver() -> ProcessSaver:
    """The process-wide saver behind ``async_save="process"``."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ProcessSaver()
        return _default


@atexit.register
def _close_all() -> None:
    # Registered after saver.py's flush hook, so it runs first (LIFO): pending
    # process saves finish, then children stop and segments are unlinked.
    for saver in list(_process_savers):
        try:
            saver.close()
        except BaseException as exc:  # noqa: BLE001 - nothing left to raise to at exit
            logging.getLogger("torchaux").error(
                "torchaux: a checkpoint save in a writer process failed and was never waited for",
                exc_info=exc,
            )
