"""HostBufferPool: warm reuse, a byte bound with LRU eviction, trim, and a release that never blocks."""

from __future__ import annotations


import pytest
from sinks import WAIT_S, background

from torchaux import _knobs
from torchaux.checkpoint.engine.pool import HostBufferPool

MiB = 1 << 20


def _save_like(pool: HostBufferPool, sizes: list[int]) -> None:
    """What one save does with the pool: acquire every buffer, then give them all back."""
    pool.release([pool.acquire(n, pinned=False) for n in sizes])


def test_constant_sizes_stay_warm() -> None:
    """A state of constant sizes is served from the cache every time (same buffer objects)."""
    pool = HostBufferPool()
    first = [pool.acquire(n, pinned=False) for n in (MiB, 2 * MiB)]
    pool.release(first)
    again = [pool.acquire(n, pinned=False) for n in (MiB, 2 * MiB)]
    assert [id(b) for b in again] == [id(b) for b in first]


def test_changing_sizes_do_not_accumulate() -> None:
    """40 saves whose sizes change every time: the cache never holds more than the largest save."""
    pool = HostBufferPool()
    largest = 0
    for step in range(1, 41):
        sizes = [4 * MiB, step * 64 * 1024]
        largest = max(largest, sum(sizes))
        _save_like(pool, sizes)
        assert pool.cached_bytes() <= largest
    assert pool.cached_bytes() <= largest


def test_explicit_bound_is_enforced() -> None:
    """TORCHAUX_POOL_CACHE_BYTES caps what stays cached between saves."""
    with _knobs.override(pool_cache_bytes=3 * MiB):
        pool = HostBufferPool()
        _save_like(pool, [MiB, MiB, MiB, MiB, MiB])
        assert pool.cached_bytes() == 3 * MiB
    bounded = HostBufferPool(cache_bytes=MiB)
    _save_like(bounded, [MiB, 2 * MiB])
    assert bounded.cached_bytes() <= MiB


def test_a_miss_evicts_before_allocating() -> None:
    """A new size evicts the least recently released buffers first, so old sizes never pile up."""
    pool = HostBufferPool()
    _save_like(pool, [MiB])
    old = pool.acquire(MiB, pinned=False)
    pool.release([old])
    pool.acquire(MiB + 1, pinned=False)  # peak is 1 MiB: the cached 1 MiB buffer must go
    assert pool.cached_bytes() == 0


def test_trim_and_clear_free_everything() -> None:
    """trim() (idle) and clear() (close) leave nothing cached."""
    pool = HostBufferPool()
    _save_like(pool, [MiB, 16])
    assert pool.trim() is True and pool.cached_bytes() == 0
    _save_like(pool, [MiB])
    pool.clear()
    assert pool.cached_bytes() == 0


def test_release_never_blocks_on_a_busy_pool() -> None:
    """release() returns while another thread holds the pool's lock (a writer never waits on a caller)."""
    pool = HostBufferPool()
    buf = pool.acquire(64, pinned=False)
    with pool._lock:
        assert background(pool.release, [buf]).result(WAIT_S) is None
        assert pool.trim(blocking=False) is False  # the idle trim skips a busy pool
    assert pool.cached_bytes() == 64


def test_bad_bound_is_refused() -> None:
    """cache_bytes must be a non-negative int."""
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0"):
        HostBufferPool(cache_bytes=-1)


def test_acquire_many_matches_one_acquire_per_request() -> None:
    """acquire_many hands out what the same acquire calls would: warm hits by size, new buffers for misses."""
    pool = HostBufferPool(cache_bytes=16 * MiB)
    warm = [pool.acquire(n, pinned=False) for n in (MiB, 10, 0)]
    pool.release(warm)
    got = pool.acquire_many([(10, False), (MiB, False), (7, False), (0, False)])
    assert [b.nbytes() for b in got] == [10, MiB, 7, 0]
    assert got[0] is warm[1] and got[1] is warm[0] and got[3] is warm[2]
    assert all(got[2] is not b for b in warm)
    assert pool.cached_bytes() == 0
    pool.release(got)
    assert pool.cached_bytes() == MiB + 17


def test_acquire_many_failure_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation failing midway returns every buffer already taken; the pool's accounting is unchanged."""
    pool = HostBufferPool(cache_bytes=16 * MiB)
    pool.release([pool.acquire(MiB, pinned=False)])
    real = pool._allocate
    calls = []

    def failing(nbytes: int, pinned: bool) -> object:
        calls.append(nbytes)
        if len(calls) == 2:
            raise MemoryError("injected")
        return real(nbytes, pinned)

    monkeypatch.setattr(pool, "_allocate", failing)
    with pytest.raises(MemoryError, match="injected"):
        pool.acquire_many([(MiB, False), (64, False), (128, False), (256, False)])
    assert calls == [64, 128]
    assert pool._in_use == 0
    assert pool.cached_bytes() == MiB + 64  # the warm hit and the one new buffer came back


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages in 'madvise' mode")
@pytest.mark.parametrize("enabled", [1, 0])
def test_large_buffers_get_huge_pages(enabled: int) -> None:
    """A 16 MiB buffer is backed by huge pages once filled; with TORCHAUX_HUGE_PAGES=0 it is not."""
    import torch

    pool = HostBufferPool()
    with _knobs.override(huge_pages=enabled):
        buf = pool.acquire(16 * MiB, pinned=False)
    torch.empty(0, dtype=torch.uint8).set_(buf).fill_(1)  # the first touch, as staging's copy
    huge = _anon_huge_kib(buf.data_ptr() + 8 * MiB)
    assert (huge > 0) == bool(enabled), huge
