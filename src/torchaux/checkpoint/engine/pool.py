"""Reusable host buffers for staging: warm memory makes a snapshot one memcpy.

The pool is bounded in bytes.  Free buffers are kept (keyed by exact size and
pinning) only up to a limit, evicting the least recently released first:

* automatic (knob ``TORCHAUX_POOL_CACHE_BYTES=0``, the default): the most
  bytes the pool has ever had in use at once, i.e. one state per pending
  save.  A state of constant sizes stays entirely warm; a state whose sizes
  change between saves never accumulates the sizes it no longer uses;
* a positive knob value: that many bytes, exactly.

The limit holds for the pool's *total* (in use + cached) whenever a request
misses the cache: older free buffers are evicted before new memory is
allocated, so a save's staging never holds more than ``max(limit, its own
buffers)``.  :meth:`HostBufferPool.trim` frees every cached buffer (the writer
calls it after ``TORCHAUX_POOL_IDLE_TRIM_S`` idle seconds; ``close()`` too).

Locking: :meth:`~HostBufferPool.release` never blocks (buffers go through a
lock-free return queue), so a writer thread returning buffers can never wait
on a caller thread - in particular not on one that a signal handler
interrupted inside :meth:`~HostBufferPool.acquire`.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

import torch

from torchaux import _knobs

__all__ = ["HostBufferPool"]

_Key = tuple[int, bool]  # (nbytes, pinned)
_log = logging.getLogger("torchaux")

# Buffers from this size on get their own mapping (see _allocate); below it the
# syscall would cost more than the 1 MiB copy it serves.
_MMAP_BYTES = 1 << 20


def _advise_huge_pages(memory: mmap.mmap) -> None:
    """Ask for transparent huge pages before the first touch (the cheap first save, _knobs)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is None or not _knobs.huge_pages_enabled():
        return
    try:
        memory.madvise(advice)
    except OSError as exc:
        # EINVAL without THP support in the kernel: the buffer works with small
        # pages, only its first fill is slower.
        _log.debug("torchaux: MADV_HUGEPAGE refused (%s); staging with 4 KiB pages", exc)


class HostBufferPool:
    """Host buffers reused across saves, keyed by exact size and pinning.

    A checkpoint's storages usually have the same sizes every step, so after
    the first save every copy lands in warm, already-faulted-in memory (a cold
    allocation costs a page fault per 4 KiB and runs ~10x slower than the copy).

    Args:
        cache_bytes: bound on the bytes kept (in use + cached) when a request
            misses; ``None`` reads the ``TORCHAUX_POOL_CACHE_BYTES`` knob at each
            use (0 there: automatic, the peak bytes in use at once).

    >>> pool = HostBufferPool()
    >>> a = pool.acquire(16, pinned=False)
    >>> pool.release([a])
    >>> pool.acquire(16, pinned=False) is a
    True
    >>> pool.release([a]); _ = pool.trim(); pool.cached_bytes()
    0
    """

    def __init__(self, cache_bytes: int | None = None) -> None:
        if cache_bytes is not None and (not isinstance(cache_bytes, int) or cache_bytes < 0):
            raise ValueError(f"cache_bytes must be an int >= 0 or None, found {cache_bytes!r}")
        self._cache_bytes = cache_bytes
        self._pinned_any = False  # set by the first pinned allocation (see _key); kept at fork
        self._reset()

    def _reset(self) -> None:
        self._free: dict[_Key, deque[torch.UntypedStorage]] = {}
        # id(buffer) -> (key, buffer), oldest release first: the eviction order.
        self._lru: OrderedDict[int, tuple[_Key, torch.UntypedStorage]] = OrderedDict()
        self._returned: queue.SimpleQueue[list[torch.UntypedStorage]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # caller side only; release() never takes it blocking
        self._cached = 0
        self._in_use = 0
        self._peak = 0

    # -- what subclasses change ------------------------------------------------

    def _allocate(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        if pinned:
            self._pinned_any = True
            return torch.empty((nbytes,), dtype=torch.uint8, pin_memory=True).untyped_storage()
        if nbytes >= _MMAP_BYTES:
            # Its own anonymous mapping, so evicting it gives the memory back to the
            # OS at once.  From malloc, a buffer below glibc's dynamic mmap threshold
            # (up to 32 MiB, mallopt(3)) lands in the heap, and freed buffers of
            # changing sizes fragment it and stay resident.
            private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
            memory = mmap.mmap(-1, nbytes, **private)  # type: ignore[arg-type]
            _advise_huge_pages(memory)
            return torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()
        return torch.UntypedStorage(nbytes)

    def _discard(self, buffers: list[torch.UntypedStorage]) -> None:
        """Free evicted buffers (the caller holds no other reference to them)."""
        buffers.clear()

    def _key(self, buf: torch.UntypedStorage) -> _Key:
        # UntypedStorage.is_pinned builds a tensor to ask (torch/storage.py),
        # ~4 us a buffer; only a pool that ever allocated pinned memory asks.
        return (buf.nbytes(), self._pinned_any and buf.is_pinned())

    # -- bookkeeping (under self._lock) --------------------------------------------

    def limit(self) -> int:
        """The byte bound in force now (see the module docstring)."""
        configured = _knobs.pool_cache_bytes() if self._cache_bytes is None else self._cache_bytes
        return configured if configured > 0 else self._peak

    def _drain_locked(self) -> None:
        while True:
            try:
                batch = self._returned.get_nowait()
            except queue.Empty:
                return
            for buf in batch:
                key = self._key(buf)
                self._free.setdefault(key, deque()).append(buf)
                self._lru[id(buf)] = (key, buf)
                self._cached += key[0]
                self._in_use -= key[0]

    def _evict_locked(self, keep_bytes: int) -> list[torch.UntypedStorage]:
        evicted: list[torch.UntypedStorage] = []
        while self._cached > max(keep_bytes, 0) and self._lru:
            _, (key, buf) = self._lru.popitem(last=False)
            # Per size, buffers are released and reused in order, so the oldest
            # buffer overall is the leftmost of its size.
            oldest = self._free[key].popleft()
            assert oldest is buf
            if not self._free[key]:
                del self._free[key]
            self._cached -= key[0]
            evicted.append(buf)
        return evicted

    # -- public ----------------------------------------------------------------------

    def acquire(self, nbytes: int, *, pinned: bool) -> torch.UntypedStorage:
        """Return a buffer of exactly ``nbytes`` bytes (warm if one is free)."""
        return self.acquire_many([(nbytes, pinned)])[0]

    def acquire_many(self, requests: Sequence[tuple[int, bool]]) -> list[torch.UntypedStorage]:
        """One buffer per ``(nbytes, pinned)`` request, in order, under one lock hold.

        The same as calling :meth:`acquire` for each request in turn (hits,
        evictions and the byte bound alike), at a fraction of the cost for
        many small storages (10^5 of them: engine review k_many.py).  On an
        error nothing stays acquired.

        >>> pool = HostBufferPool()
        >>> [b.nbytes() for b in pool.acquire_many([(8, False), (0, False)])]
        [8, 0]
        """
        out: list[torch.UntypedStorage | None] = []
        misses: list[int] = []
        evicted: list[torch.UntypedStorage] = []
        with self._lock:
            self._drain_locked()
            for nbytes, pinned in requests:
                key = (nbytes, pinned)
                free = self._free.get(key)
                if free:
                    buf = free.pop()
                    del self._lru[id(buf)]
                    self._cached -= nbytes
                    if not free:
                        del self._free[key]
                    out.append(buf)
                else:
                    # A miss: make room first, so old sizes are freed before new memory is touched.
                    evicted += self._evict_locked(self.limit() - self._in_use - nbytes)
                    misses.append(len(out))
                    out.append(None)
                self._in_use += nbytes
                self._peak = max(self._peak, self._in_use)
        self._discard(evicted)
        try:
            for i in misses:
                out[i] = self._allocate(*requests[i])
        except BaseException:
            with self._lock:
                self._in_use -= sum(requests[i][0] for i in misses if out[i] is None)
            self.release(b for b in out if b is not None)
            raise
        return out  # type: ignore[return-value]

    def warm(self, requests: Sequence[tuple[int, bool]]) -> int:
        """Allocate buffers for ``requests`` now, touch every page, and keep them; return the bytes.

        The next saves of those sizes copy into faulted-in memory (the cheap
        first save, :meth:`AsyncSaver.prepare`).

        >>> pool = HostBufferPool()
        >>> pool.warm([(1 << 20, False)]), pool.cached_bytes()
        (1048576, 1048576)
        """
        buffers = self.acquire_many(requests)
        try:
            for buf in buffers:
                if buf.nbytes():
                    torch.empty(0, dtype=torch.uint8, device=buf.device).set_(buf).zero_()
            return sum(buf.nbytes() for buf in buffers)
        finally:
            self.release(buffers)

    def release(self, buffers: Iterable[torch.UntypedStorage]) -> None:
        """Give buffers back for the next save (never blocks)."""
        batch = list(buffers)
        if batch:
            self._returned.put(batch)
        del batch
        # Enforce the bound now if no caller is inside acquire(); else that caller does.
        if self._lock.acquire(blocking=False):
            try:
                self._drain_locked()
                evicted = self._evict_locked(self.limit() - self._in_use)
            finally:
                self._lock.release()
            self._discard(evicted)

    def cached_bytes(self) -> int:
        """Bytes held in free buffers."""
        with self._lock:
            self._drain_locked()
            return self._cached

    def trim(self, *, blocking: bool = True) -> bool:
        """Free every cached buffer; with ``blocking=False`` skip (False) if the pool is busy."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            self._drain_locked()
            evicted = self._evict_locked(0)
        finally:
            self._lock.release()
        self._discard(evicted)
        return True

    def clear(self) -> None:
        """Drop every free buffer (memory returns to the allocator)."""
        self.trim()

    def _after_fork_in_child(self) -> None:
        # Another thread may have held the lock at fork; the child starts afresh.
        self._reset()
