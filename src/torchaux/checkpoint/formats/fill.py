"""Parallel positioned reads of a checkpoint's bytes straight into tensor memory, CRC-32 on the way.

A *source* gives the plaintext of a checkpoint by offset: :class:`FileSource`
(``os.preadv`` on a file descriptor: no file position, so thread-safe, and the
GIL is released during the copy), :class:`BufferSource` (bytes already in
memory), or the decrypting source of :mod:`torchaux.checkpoint.crypto.seekable`.
:func:`fill` copies byte ranges of it into preallocated destinations
(:class:`Target`: usually a tensor's storage, so no intermediate ``bytes``
exist) on a few threads, and computes the CRC-32 of every piece right after it
lands, while it is still in cache; the pieces' CRCs are then joined with
``crc32_combine`` into each target's CRC.  Memory: the destinations plus
nothing (plain files) or a chunk buffer per thread (encrypted files).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import torch

from torchaux import _knobs
from torchaux.checkpoint.crc32 import crc32, crc32_combine
from torchaux.errors import IntegrityError

__all__ = [
    "Target", "Placed", "Source", "FileSource", "BufferSource", "fill", "checksum", "crc32_combine",
    "default_workers", "allocate", "storage_view", "PIECE_BYTES", "THREAD_NAME_PREFIX",
]

#: Bytes one job of a plain file reads (one ``preadv``).  8 MiB: large enough that
#: the syscall and thread hand-off cost vanish (<0.1% at 2 GB/s), small enough
#: that a 256 MiB state is 32 jobs and the threads stay balanced.
PIECE_BYTES = 8 << 20
#: Name prefix of the reading threads (visible in debuggers and py-spy dumps).
THREAD_NAME_PREFIX = "torchaux-load"
# Upper bound of the default thread count: reads from the page cache scale with
# cores; from a disk, more requests in flight help until the device queue is full.
_MAX_WORKERS = 8
# Fewest threads even on one core: a thread waiting on the disk leaves the core
# to another one's copy or CRC.
_MIN_WORKERS = 2


class Target(NamedTuple):
    """``len(view)`` bytes of the source from ``offset`` go into ``view`` (writable bytes)."""

    offset: int
    view: memoryview


#: ``(target index, offset inside the target, the bytes placed there)``.
Placed = tuple[int, int, memoryview]


class Source(Protocol):
    """Plaintext bytes by offset (the protocol :func:`fill` reads through)."""

    name: str
    size: int

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset`` (IntegrityError past the end)."""

    def jobs(self, targets: Sequence[Target]) -> list[Callable[[], list[Placed]]]:
        """Independent jobs that together fill every target (and check everything read)."""


def default_workers() -> int:
    """Reading threads: ``TORCHAUX_LOAD_WORKERS``, or usable cores, at least 2 and at most 8."""
    configured = _knobs.load_workers()
    if configured:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(_MIN_WORKERS, min(cores, _MAX_WORKERS))


_HUGE = 2 << 20  # x86-64 and aarch64 (4 KiB base pages) transparent huge page size
_MADV_HUGEPAGE = 14  # <asm-generic/mman-common.h>
_libc: Any = None


def allocate(nbytes: int) -> torch.UntypedStorage:
    """An uninitialised CPU storage, advised to use transparent huge pages (Linux).

    Filling fresh memory is bound by page faults: a 256 MiB storage faulted in
    4 KiB pages took 0.33 s, with ``MADV_HUGEPAGE`` 0.05-0.08 s (2-core
    reference VM, THP mode ``madvise``, 2026-12-02; ``torch.UntypedStorage`` then
    ``fill_``).  The advice is only a hint: where it is refused, nothing changes.

    >>> allocate(10).nbytes()
    10
    """
    global _libc
    storage = torch.UntypedStorage(nbytes)
    if nbytes >= 2 * _HUGE and sys.platform == "linux":
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        start = -(-storage.data_ptr() // _HUGE) * _HUGE
        length = (storage.data_ptr() + nbytes - start) // _HUGE * _HUGE
        if length > 0:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    return storage


def storage_view(storage: torch.UntypedStorage) -> memoryview:
    """A writable byte view of a CPU storage's memory (valid while ``storage`` lives).

    >>> s = torch.UntypedStorage(3)
    >>> storage_view(s)[:] = b"abc"
    >>> bytes(s)
    b'abc'
    """
    n = storage.nbytes()
    if n == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_char * n).from_address(storage.data_ptr())
    array._owner = storage  # type: ignore[attr-defined]  # keeps the memory alive
    return memoryview(array).cast("B")


def _pieces(targets: Sequence[Target], piece: int) -> list[tuple[int, int, int]]:
    """``(target index, start, end)`` slices of at most ``piece`` bytes covering every target."""
    out = []
    for i, t in enumerate(targets):
        n = len(t.view)
        out += [(i, a, min(a + piece, n)) for a in range(0, n, piece)]
    return out


class FileSource:
    """A file descriptor's bytes from ``base`` on, read with ``os.preadv`` (thread-safe).

    The descriptor is not owned: the caller keeps it open while the source is used.

    >>> import tempfile
    >>> with tempfile.TemporaryFile() as f:
    ...     _ = f.write(b"0123456789"); f.flush()
    ...     FileSource(f.fileno(), "f").read(3, 4)
    b'3456'
    """

    def __init__(self, fd: int, name: str, base: int = 0) -> None:
        self.fd, self.name, self.base = fd, name, base
        self.size = os.fstat(fd).st_size - base

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``; IntegrityError if the file ends first."""
        done, n = 0, len(view)
        while done < n:
            got = os.preadv(self.fd, [view[done:]], self.base + offset + done)
            if got <= 0:
                raise IntegrityError(
                    f"{self.name}: the file ended at byte {offset + done}, expected {offset + n} "
                    "bytes (it is truncated, or shrank while being read)"
                )
            done += got

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset``."""
        out = bytearray(n)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def jobs(self, targets: Sequence[Target]) -> list[Callable[[], list[Placed]]]:
        """One ``preadv`` per piece of :data:`PIECE_BYTES`, straight into the target."""

        def job(i: int, a: int, b: int) -> list[Placed]:
            view = targets[i].view[a:b]
            self.readinto(targets[i].offset + a, view)
            return [(i, a, view)]

        return [lambda i=i, a=a, b=b: job(i, a, b) for i, a, b in _pieces(targets, PIECE_BYTES)]


class BufferSource:
    """Bytes already in memory (a file object's content, a remote object's download)."""

    def __init__(self, data: bytes | bytearray | memoryview, name: str) -> None:
        self._data = memoryview(data).cast("B")
        self.name, self.size = name, len(self._data)

    @property
    def view(self) -> memoryview:
        """The bytes in place, read-only (parsing a mapped file's headers copies nothing)."""
        return self._data.toreadonly()

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset``."""
        if offset < 0 or offset + n > self.size:
            raise IntegrityError(
                f"{self.name}: expected {n} bytes at byte {offset}, but it holds {self.size} "
                "bytes (truncated?)"
            )
        return bytes(self._data[offset : offset + n])

    def jobs(self, targets: Sequence[Target]) -> list[Callable[[], list[Placed]]]:
        """One copy per piece (memoryview copies: bytes in memory gain nothing from threads)."""

        def job(i: int, a: int, b: int) -> list[Placed]:
            t = targets[i]
            view = t.view[a:b]
            if t.offset + b > self.size:
                raise IntegrityError(f"{self.name}: ends before byte {t.offset + b} (truncated?)")
            view[:] = self._data[t.offset + a : t.offset + b]
            return [(i, a, view)]

        return [lambda i=i, a=a, b=b: job(i, a, b) for i, a, b in _pieces(targets, PIECE_BYTES)]


def fill(
    source: Source, targets: Sequence[Target], *, crc: bool = False, workers: int | None = None
) -> list[int] | None:
    """Copy every target's bytes from ``source``; with ``crc``, return each target's CRC-32.

    Jobs run on ``workers`` threads (default :func:`default_workers`).  The
    first failing job, in job order, raises; the others are cancelled or
    waited for, so no thread still writes into a target when this returns.

    Example:
        >>> out = bytearray(4)
        >>> fill(BufferSource(b"xxabcd", "b"), [Target(2, memoryview(out))], crc=True)
        [3984772369]
        >>> bytes(out)
        b'abcd'
    """

    def run(job: Callable[[], list[Placed]]) -> list[tuple[int, int, int, int]]:
        placed = job()
        return [(i, a, len(v), crc32(v)) for i, a, v in placed] if crc else []

    results = _run([lambda job=job: run(job) for job in source.jobs(targets)], workers)
    return _combined(results, len(targets)) if crc else None


def checksum(views: Sequence[memoryview], workers: int | None = None) -> list[int]:
    """CRC-32 of each view, pieces on several threads (for memory-mapped storages).

    >>> checksum([memoryview(b"hello"), memoryview(b"")]) == [crc32(b"hello"), 0]
    True
    """
    targets = [Target(0, v) for v in views]

    def job(i: int, a: int, b: int) -> list[tuple[int, int, int, int]]:
        return [(i, a, b - a, crc32(targets[i].view[a:b]))]

    jobs = [lambda i=i, a=a, b=b: job(i, a, b) for i, a, b in _pieces(targets, PIECE_BYTES)]
    return _combined(_run(jobs, workers), len(targets))


def _run(jobs: list[Callable[[], Any]], workers: int | None) -> list[Any]:
    """Every job's result, in order; the first failure (in job order) raises after all stop."""
    n_workers = min(workers or default_workers(), max(1, len(jobs)))
    if n_workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(n_workers, thread_name_prefix=THREAD_NAME_PREFIX) as pool:
        futures: list[Future[Any]] = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _combined(results: list[list[tuple[int, int, int, int]]], n: int) -> list[int]:
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for placed in results:
        for i, a, size, c in placed:
            pieces[i].append((a, size, c))
    out = []
    for parts in pieces:
        value = 0
        for _, size, c in sorted(parts):
            value = crc32_combine(value, c, size)
        out.append(value)
    return out

