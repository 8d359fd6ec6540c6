"""Host copies that compute each staged storage's CRC-32 on the way.

Why: a ``torch.save`` file holds a CRC-32 per zip record.  Computed by the
writer, that CRC reads every staged byte back from memory a second time; on
the 2-core reference VM it was most of the writer's CPU (256 MiB: the copy
32 ms wall on two threads, then the CRC 30 ms on the writer - bound by memory
bandwidth, not by zlib-ng's 32 GB/s).  Copying in pieces small enough to stay
in the cache and taking each piece's CRC right after its copy reads the bytes
from memory once: 256 MiB in 35 ms wall and 64-69 ms CPU over two threads,
against 32 ms and 94-98 ms for the copy plus the writer's CRC
(``/tmp`` A/B, 2026-12-03, docs/benchmarks.md §15).

The copies run on the caller plus ``torch.get_num_threads() - 1`` worker
threads (the cores torch's own ``copy_`` would use); ``ctypes.memmove`` and
zlib-ng's CRC both release the GIL.  Large storages are split into pieces
whose CRCs are joined with ``crc32_combine`` (zlib-ng), so one big flat
parameter still spreads over the threads.  Part of staging: only this package
reads live tensors.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from torchaux.checkpoint.crc32 import BACKEND, crc32, crc32_combine
from torchaux.checkpoint.engine.staging.copies import Record, copy_host

__all__ = ["AVAILABLE", "copy_host_with_crc", "copy_one_with_crc", "copy_records", "fits", "MIN_BYTES"]

#: Only with zlib-ng's CRC: zlib's (~6 GB/s) on the caller would add ~40 ms per
#: 256 MiB to the stall instead of 3.5 ms; the writer then computes it, as before.
AVAILABLE = BACKEND == "zlib-ng"

# Storages below this size are copied as before and CRC'd by the writer: the
# CRC of a few KiB is cheap there, and a second call per small tensor would add
# to the caller's stall on states of 10^5 small tensors.
MIN_BYTES = 1 << 16
# Copy-then-CRC unit: 256 KiB stays in L2 between the two passes (1 MiB and
# 4 MiB measured 5% and 20% slower in the A/B above).
_CHUNK = 256 << 10
# Work item per thread: big enough that handing it out costs nothing, small
# enough that two threads finish a 22 MiB tensor together.
_PIECE = 8 << 20

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child has none of the parent's worker threads.
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _start_helpers(count: int, work: Callable[[], None]) -> list[Future[None]]:
    # Submitted under the lock: a concurrent save that grows the pool (after a
    # torch.set_num_threads) never shuts down a pool another is submitting to.
    global _pool, _pool_workers
    if count <= 0:
        return []
    with _pool_lock:
        if _pool is None or _pool_workers < count:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its running pieces finish; no new ones
            _pool = ThreadPoolExecutor(count, thread_name_prefix="torchaux-stage")
            _pool_workers = count
        return [_pool.submit(work) for _ in range(count)]


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _copy_piece(dst: int, src: int, nbytes: int) -> int:
    # memmove then CRC of the same bytes while they are in the cache.
    out = _view(dst, nbytes)
    value = 0
    for offset in range(0, nbytes, _CHUNK):
        n = min(_CHUNK, nbytes - offset)
        ctypes.memmove(dst + offset, src + offset, n)
        value = crc32(out[offset : offset + n], value)
    return value


def fits(staged: torch.UntypedStorage, source: torch.UntypedStorage) -> bool:
    """Whether a pair takes the fused path: large enough, and sizes equal (else copy_host raises)."""
    n = source.nbytes()
    return n >= MIN_BYTES and n == staged.nbytes()


def copy_one_with_crc(staged: torch.UntypedStorage, source: torch.UntypedStorage) -> int:
    """Copy one pair on the calling thread only; return the CRC-32 (deferred ``model=`` copies).

    >>> src = torch.arange(1 << 14, dtype=torch.int32).untyped_storage()
    >>> dst = torch.UntypedStorage(src.nbytes())
    >>> copy_one_with_crc(dst, src) == copy_host_with_crc([(dst, src)])[0]
    True
    """
    return _copy_piece(staged.data_ptr(), source.data_ptr(), source.nbytes())


def copy_host_with_crc(pairs: list[tuple[torch.UntypedStorage, torch.UntypedStorage]]) -> list[int]:
    """Copy each ``(staged, source)`` CPU storage pair; return the staged bytes' CRC-32s.

    Every source must have its staged buffer's size (the caller checked) and be
    at least :data:`MIN_BYTES`.  Returns once every copy is done, also when it
    raises (no thread is left writing into a buffer the caller gives back).

    >>> src = torch.arange(1 << 14, dtype=torch.int32).untyped_storage()
    >>> dst = torch.UntypedStorage(src.nbytes())
    >>> import zlib
    >>> copy_host_with_crc([(dst, src)]) == [zlib.crc32(bytes(src))]
    True
    >>> bytes(dst) == bytes(src)
    True
    """
    pieces: list[tuple[int, int, int, int]] = []  # (pair, dst, src, nbytes)
    for i, (dst, src) in enumerate(pairs):
        nbytes = src.nbytes()
        d, s = dst.data_ptr(), src.data_ptr()
        for offset in range(0, nbytes, _PIECE):
            pieces.append((i, d + offset, s + offset, min(_PIECE, nbytes - offset)))
    results: list[int] = [0] * len(pieces)
    counter = itertools.count()  # next() is atomic under the GIL: the shared work queue
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            k = next(counter)
            if k >= len(pieces):
                return
            _, d, s, n = pieces[k]
            results[k] = _copy_piece(d, s, n)

    futures = _start_helpers(min(torch.get_num_threads(), len(pieces)) - 1, work)
    try:
        work()
    finally:
        stop.set()
        _join(futures)
    for f in futures:
        f.result()  # a helper's failure (none expected from memmove/crc) reaches the caller
    crcs = [0] * len(pairs)
    started = [False] * len(pairs)
    for (i, _, _, n), value in zip(pieces, results):
        crcs[i] = crc32_combine(crcs[i], value, n) if started[i] else value
        started[i] = True
    return crcs


def copy_records(records: list[Record], with_crc: bool) -> None:
    """The immediate copies of a snapshot's CPU records; large ones with their CRC-32 when asked."""
    fused: list[Record] = []
    for r in records:
        if r.source is None or r.on_device:
            continue
        if with_crc and fits(r.staged, r.source):
            fused.append(r)
        else:
            copy_host(r.staged, r.source)
            r.source = None
    if fused:
        crcs = copy_host_with_crc([(r.staged, r.source) for r in fused])  # type: ignore[misc]
        for r, value in zip(fused, crcs):
            r.crc = value
            r.source = None


def _join(futures: list[Future[None]]) -> None:
    # An interrupt must not return while a helper still writes into a staged
    # buffer; each holds at most one piece (a few ms), so keep waiting.
    while True:
        try:
            wait_futures(futures)
            return
        except KeyboardInterrupt:
            continue
