"""Reusable host buffers for staging: warm memory makes a snapshot one memcpy."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

import torch

__all__ = ["HostBufferPool"]


class HostBufferPool:
    """Host buffers reused across saves, keyed by exact size and pinning.

    A checkpoint's storages usually have the same sizes every step, so after
    the first save every copy lands in warm, already-faulted-in memory (a cold
    allocation costs a page fault per 4 KiB and runs ~10x slower than the copy).

    >>> pool = HostBufferPool()
    >>> a = pool.acquire(16, pinned=False)
    >>> pool.release([a])
    >>> pool.acquire(16, pinned=False) is a
    True
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.UntypedStorage]] = defaultdict(list)
        self._lock = threading.Lock()

    def acquire(self, nbytes: int, *, pinned: bool) -> torch.UntypedStorage:
        """Return a buffer of exactly ``nbytes`` bytes (warm if one is free)."""
        with self._lock:
            free = self._free.get((nbytes, pinned))
            if free:
                return free.pop()
        if pinned:
            return torch.empty((nbytes,), dtype=torch.uint8, pin_memory=True).untyped_storage()
        return torch.UntypedStorage(nbytes)

    def release(self, buffers: Iterable[torch.UntypedStorage]) -> None:
        """Give buffers back for the next save."""
        with self._lock:
            for buf in buffers:
                self._free[(buf.nbytes(), buf.is_pinned())].append(buf)

    def cached_bytes(self) -> int:
        """Bytes held in free buffers."""
        with self._lock:
            return sum(n * len(v) for (n, _), v in self._free.items())

    def clear(self) -> None:
        """Drop every free buffer (memory returns to the allocator)."""
        with self._lock:
            self._free.clear()
