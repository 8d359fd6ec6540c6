"""Internal tunables, in one place, each with an environment override.

Every knob is read when it is used (not at import), so tests and users can
change the environment or use :func:`override` at any time.

>>> from torchaux import _knobs
>>> with _knobs.override(max_pending_saves=2):
...     _knobs.max_pending_saves()
2
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_DEFAULTS: dict[str, int] = {
    # Saves whose staging buffers a saver may hold at once.  One keeps peak host
    # memory at one extra copy of the state (issue #2, "bounded memory"); a new
    # save waits for the previous one to finish writing.
    "max_pending_saves": 1,
    # 1: fsync the file and its directory before a save counts as committed.
    # 0 stays atomic against a process crash, but a power loss can leave the
    # target empty or torn: the rename may reach the disk before the data
    # (tests/checkpoint/storage/test_crash_states.py's negative control).
    "fsync": 1,
    # 1: use pinned (page-locked) host buffers when staging accelerator tensors,
    # so the device-to-host copies are asynchronous DMA transfers.
    "pin_memory": 1,
    # 1: ask for transparent huge pages (madvise) on staging buffers of >= 1 MiB,
    # so a cold pool's first save pays one fault per 2 MiB instead of per 4 KiB:
    # copying 256 MiB into fresh memory took 0.30 s with 4 KiB pages, 0.073 s
    # with MADV_HUGEPAGE, 0.062 s warm (2-core VM, THP "madvise", 2026-12-02).
    "huge_pages": 1,
    # 1: torch.save-format saves compute each large storage's zip CRC-32 during
    # the staging copy, while its bytes are in the cache (engine/staging/
    # crc_copies.py: 256 MiB cost the caller +3.5 ms and saved the writer 30 ms
    # of CPU on the 2-core VM); 0: the writer computes every CRC.
    "staging_crc": 1,
    # Threads that read (and CRC, decrypt) a checkpoint being loaded; 0 =
    # automatic: the usable cores, at least 2 (a thread waiting on the disk
    # leaves its core to another's copy) and at most 8.
    "load_workers": 0,
    # Size of the write buffer between the zip writer and the temp file.  Large
    # records bypass it; it only batches the small header records.
    "write_buffer_bytes": 1 << 20,
    # 1: write checkpoint files with O_DIRECT where the file system allows it
    # (4x faster to durable on an eighth of the CPU of the page cache on the
    # benchmark VM, docs/benchmarks.md §4); 0: ordinary buffered writes.
    "direct_io": 1,
    # Bytes per aligned buffer of a direct-I/O file (three at most per file).
    # 16 MiB: 8 MiB measured slower, 32 MiB no faster (docs/benchmarks.md §4).
    "direct_io_buffer_bytes": 16 << 20,
    # Plaintext bytes per encrypted chunk (crypto/writer.py explains the choice:
    # per-chunk cost is negligible at 4 MiB, 16 MiB starves the CBC thread pool).
    "encryption_chunk_bytes": 4 << 20,
    # Cipher threads; 0 = automatic (1 for AES-GCM, one per core up to 8 for CBC).
    "encryption_workers": 0,
    # Bytes of host copies save_graph_tensor may queue before a dump waits for
    # the writer (a burst of per-layer dumps costs the caller only its copies).
    "dump_queue_bytes": 256 << 20,
    # Milliseconds without a new dump before the dump queue starts writing: a
    # burst of dumps is not slowed by the writer competing for the GIL
    # (measured: 1 KB dumps cost the caller 197 us with an eager drain, 26 us
    # without; docs/benchmarks.md, "Tensor dumps").
    "dump_idle_ms": 2,
    # Seconds a distributed save (torchaux.distributed.save_async) waits for
    # the other ranks before failing with CheckpointError; 10 minutes matches
    # the NCCL watchdog's default, so a healthy but slow save never trips it.
    "distributed_timeout_s": 600,
    # Bytes per part of a remote (S3) upload; S3 needs >= 5 MiB for all parts but
    # the last.  16 MiB keeps (concurrency + 1) part buffers at 80 MiB
    # (checkpoint/storage/remote.py; measured against s3fs put_file in docs/benchmarks.md).
    "upload_part_bytes": 16 << 20,
    # Parts of one remote upload in flight at once (s3fs's put_file default is 10).
    "upload_concurrency": 4,
    # Bytes of host staging buffers a saver's pool keeps between saves (in use +
    # cached, enforced when a request misses); 0 = automatic: the most bytes the
    # pool ever had in use at once (one state per pending save), so a state of
    # constant sizes stays warm and changing sizes never accumulate (issue #14.5).
    "pool_cache_bytes": 0,
    # Seconds a saver's writer may sit idle before its cached staging buffers are
    # freed (0: never).  10 minutes: saves more frequent than that keep warm
    # buffers (a cold copy is ~10x slower, engine/pool.py); rarer ones give the
    # memory back between saves (issue #15.5).
    "pool_idle_trim_s": 600,
    # Seconds the interpreter-exit flush waits for pending saves, in total, before
    # abandoning them with an ERROR log (the previous file at each target stays
    # intact).  Bounded so a hung file system cannot hang exit (issue #14.2); 10
    # minutes covers a 100 GiB state at 200 MiB/s.  0: do not wait at all.
    "exit_flush_timeout_s": 600,
}

_overrides: dict[str, int] = {}


def _get(name: str) -> int:
    if name in _overrides:
        return _overrides[name]
    env = os.environ.get("TORCHAUX_" + name.upper())
    if env is None or env == "":
        return _DEFAULTS[name]
    try:
        return int(env)
    except ValueError:
        raise ValueError(
            f"environment variable TORCHAUX_{name.upper()} must be an integer, "
            f"found {env!r}; unset it or set e.g. {_DEFAULTS[name]}"
        ) from None


def max_pending_saves() -> int:
    """Saves a saver may hold staging buffers for (``TORCHAUX_MAX_PENDING_SAVES``)."""
    return max(1, _get("max_pending_saves"))


def fsync_enabled() -> bool:
    """Whether commits fsync file and directory (``TORCHAUX_FSYNC``)."""
    return _get("fsync") != 0


def load_workers() -> int:
    """Loading threads, 0 = automatic (``TORCHAUX_LOAD_WORKERS``)."""
    return max(0, _get("load_workers"))


def huge_pages_enabled() -> bool:
    """Whether large staging buffers ask for transparent huge pages (``TORCHAUX_HUGE_PAGES``)."""
    return _get("huge_pages") != 0


def staging_crc_enabled() -> bool:
    """Whether staging copies compute the records' CRC-32 (``TORCHAUX_STAGING_CRC``)."""
    return _get("staging_crc") != 0


def pin_memory_enabled() -> bool:
    """Whether staging uses pinned host memory for device tensors (``TORCHAUX_PIN_MEMORY``)."""
    return _get("pin_memory") != 0


def write_buffer_bytes() -> int:
    """Bytes of buffering between the serializer and the file (``TORCHAUX_WRITE_BUFFER_BYTES``)."""
    return max(0, _get("write_buffer_bytes"))


def direct_io_enabled() -> bool:
    """Whether checkpoint files are written with O_DIRECT where possible (``TORCHAUX_DIRECT_IO``)."""
    return _get("direct_io") != 0


def direct_io_buffer_bytes() -> int:
    """Bytes per aligned direct-I/O buffer (``TORCHAUX_DIRECT_IO_BUFFER_BYTES``)."""
    return max(1, _get("direct_io_buffer_bytes"))


def encryption_chunk_bytes() -> int:
    """Plaintext bytes per encrypted chunk (``TORCHAUX_ENCRYPTION_CHUNK_BYTES``)."""
    return _get("encryption_chunk_bytes")


def encryption_workers() -> int | None:
    """Cipher threads, or None for automatic (``TORCHAUX_ENCRYPTION_WORKERS``)."""
    n = _get("encryption_workers")
    return n if n > 0 else None


def distributed_timeout_s() -> int:
    """Seconds a distributed save waits for other ranks (``TORCHAUX_DISTRIBUTED_TIMEOUT_S``)."""
    return max(1, _get("distributed_timeout_s"))


def upload_part_bytes() -> int:
    """Bytes per part of a remote multipart upload (``TORCHAUX_UPLOAD_PART_BYTES``)."""
    return max(1, _get("upload_part_bytes"))


def upload_concurrency() -> int:
    """Parts of one remote upload in flight at once (``TORCHAUX_UPLOAD_CONCURRENCY``)."""
    return max(1, _get("upload_concurrency"))


def pool_cache_bytes() -> int:
    """Byte bound of a saver's staging pool, 0 = automatic (``TORCHAUX_POOL_CACHE_BYTES``)."""
    return max(0, _get("pool_cache_bytes"))


def pool_idle_trim_s() -> int:
    """Idle seconds before a writer frees its cached buffers, 0 = never (``TORCHAUX_POOL_IDLE_TRIM_S``)."""
    return max(0, _get("pool_idle_trim_s"))


def exit_flush_timeout_s() -> int:
    """Seconds the exit flush waits for pending saves (``TORCHAUX_EXIT_FLUSH_TIMEOUT_S``)."""
    return max(0, _get("exit_flush_timeout_s"))


def dump_queue_bytes() -> int:
    """Bytes of queued dump copies before a dump waits (``TORCHAUX_DUMP_QUEUE_BYTES``)."""
    return max(1, _get("dump_queue_bytes"))


def dump_idle_ms() -> int:
    """Quiet milliseconds before queued dumps are written (``TORCHAUX_DUMP_IDLE_MS``)."""
    return max(0, _get("dump_idle_ms"))


@contextlib.contextmanager
def override(**values: int) -> Iterator[None]:
    """Temporarily set knobs (tests and benchmarks); restores them on exit."""
    unknown = set(values) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
