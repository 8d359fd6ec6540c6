"""Writing checkpoint files around the page cache (``O_DIRECT``), with a write-behind thread.

A checkpoint is written once and read rarely, so copying it into the page
cache buys nothing and costs a lot: the copy itself, a page fault for every
new cache page, dirty-page throttling, and an fsync that must then push the
whole file out.  Measured on the 2-core VM of docs/benchmarks.md §4 (1 GiB,
write + fsync, ``python -m torchaux.cli.bench.disk_io``): buffered 0.71 GB/s on
1.27 s of CPU; ``O_DIRECT`` from 16 MiB aligned buffers with a write-behind
thread 2.95 GB/s on 0.16 s of CPU.  DeepSpeed's FastPersist makes the same
choice for checkpoints on NVMe.

:class:`DirectFile` is a write-only file object: ``write`` copies into
page-aligned buffers (``O_DIRECT`` needs the address, the length and the file
offset aligned to the device's logical block size, open(2) "O_DIRECT"), full
buffers go to one background thread that writes them while the caller fills
the next, and :meth:`DirectFile.finish` writes the aligned rest directly and
the last partial block through the page cache.  A failure of the background
thread is raised by the next ``write``/``flush``/``finish``, never dropped.

:func:`enable_direct_io` switches an open descriptor to ``O_DIRECT`` where the
platform and file system allow it (Linux; not tmpfs); callers fall back to an
ordinary buffered file otherwise.  Only :mod:`.commit` opens checkpoint files.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
from types import TracebackType

from torchaux.checkpoint.cpu_time import counted

__all__ = ["ALIGNMENT", "DirectFile", "enable_direct_io"]

#: Alignment of buffers, lengths and offsets.  Logical block sizes are 512 or
#: 4096 bytes (open(2), "O_DIRECT": "typically 4096 bytes"); 4096 suits both.
ALIGNMENT = 4096
# Buffers handed to the write-behind thread but not yet written.  Two keep the
# device busy while the caller fills a third (measured: more gains nothing).
_QUEUE_DEPTH = 2
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# write_retained() sends bytes to the disk in place from this size on; below it
# the copy into an aligned buffer is cheaper than the extra hand-offs.
_RETAINED_MIN_BYTES = 1 << 20
# Copies into a buffer from this size on go through ctypes.memmove, which
# releases the GIL (ctypes docs, "foreign functions ... release the GIL");
# a memoryview slice assignment holds it for the whole memcpy (~3 ms per
# 16 MiB here), and the training thread waits that long for its next op.
_NOGIL_COPY_BYTES = 1 << 16

# Buffers of finished files, kept for the next file: one file's worth, so each
# save after the first writes into memory that is already faulted in (a fresh
# 16 MiB mapping costs 4096 page faults; profiled at ~3% of a save's CPU).
_spare_lock = threading.Lock()
_spare: dict[int, list[mmap.mmap]] = {}


def _new_or_spare(size: int) -> mmap.mmap:
    with _spare_lock:
        free = _spare.get(size)
        if free:
            return free.pop()
    return mmap.mmap(-1, size)  # anonymous: page-aligned


def _keep_spares(size: int, buffers: list[mmap.mmap]) -> None:
    with _spare_lock:
        free = _spare.setdefault(size, [])
        free.extend(buffers[: max(0, _QUEUE_DEPTH + 1 - len(free))])


def enable_direct_io(fd: int) -> bool:
    """Turn on ``O_DIRECT`` for ``fd``; return whether the file system accepted it.

    >>> import tempfile
    >>> with tempfile.TemporaryFile() as f:
    ...     isinstance(enable_direct_io(f.fileno()), bool)
    True
    """
    if not _O_DIRECT:
        return False
    import fcntl  # POSIX only, like O_DIRECT itself

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # e.g. tmpfs, some FUSE mounts
            return False
        raise
    return True


def _disable_direct_io(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class DirectFile:
    """A write-only file over ``fd`` (already ``O_DIRECT``) that writes in the background.

    ``write`` copies its argument, so the caller's buffer is free on return.
    :meth:`finish` must be called after the last ``write``; it returns once
    every byte is in the file (not yet fsynced: that stays with the caller).
    :meth:`abort` stops without finishing.  The descriptor is never closed.

    Args:
        fd: a descriptor opened for writing at offset 0, with ``O_DIRECT`` set.
        buffer_bytes: bytes per buffer, rounded up to :data:`ALIGNMENT`;
            memory is at most ``_QUEUE_DEPTH + 1`` buffers, which a finished
            file leaves to the next one (that many are kept per size).

    Example:
        >>> import os, tempfile
        >>> fd, path = tempfile.mkstemp()
        >>> f = DirectFile(fd, buffer_bytes=8192)  # works without O_DIRECT too
        >>> f.write(b"x" * 10000)
        10000
        >>> f.finish(); os.close(fd)
        >>> os.path.getsize(path)
        10000
        >>> os.unlink(path)
    """

    def __init__(self, fd: int, *, buffer_bytes: int) -> None:
        self._fd = fd
        self._size = max(ALIGNMENT, -(-buffer_bytes // ALIGNMENT) * ALIGNMENT)
        self._buffers: list[mmap.mmap] = []  # every buffer made, for release
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._current: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0
        self._address = 0  # of self._current
        self._reserved = 0
        self._direct = True
        # (buffer, bytes to write); a buffer is an mmap of ours (recycled) or a
        # caller's memoryview from write_retained (released once written)
        self._todo: queue.Queue[tuple[mmap.mmap | memoryview, int] | None] = queue.Queue(_QUEUE_DEPTH)
        self._handed = 0  # bytes queued to the thread so far (the file offset of self._current)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._state = "open"

    # -- file-object surface ---------------------------------------------
    def writable(self) -> bool:
        """True: a write-only file."""
        return True

    def fileno(self) -> int:
        """The descriptor written to."""
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`finish` or :meth:`abort` has run."""
        return self._state != "open"

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` (any C-contiguous bytes-like object) into the file; return its length."""
        self._check()
        return self._copy_in(memoryview(data).cast("B"), None)

    def _copy_in(self, src: memoryview, address: int | None) -> int:
        # ``address``: where ``src`` starts in memory, when known; large
        # pieces are then copied without the GIL.
        pos, n = 0, len(src)
        while pos < n:
            if self._view is None:
                self._take_buffer()
            assert self._view is not None
            k = min(self._size - self._fill, n - pos)
            if address is not None and k >= _NOGIL_COPY_BYTES:
                ctypes.memmove(self._address + self._fill, address + pos, k)
            else:
                self._view[self._fill : self._fill + k] = src[pos : pos + k]
            self._fill += k
            pos += k
            if self._fill == self._size:
                self._hand_off()
        return n

    #: Record alignment at which :meth:`write_retained` avoids the copy (page-aligned buffers).
    RETAINED_ALIGNMENT = ALIGNMENT

    def write_retained(self, data: memoryview, address: int) -> int:
        """Write ``data``, which the caller keeps alive and unchanged until :meth:`finish` or :meth:`abort`.

        ``address`` is where ``data`` starts in memory.  When it is congruent
        with the file position modulo :data:`ALIGNMENT` (a page-aligned staging
        buffer at an aligned record, ``formats/torch_save/writer.py``), the
        aligned middle goes to the disk straight from ``data``: no copy.  Else,
        and for the unaligned head and tail, as :meth:`write`.
        """
        self._check()
        src = memoryview(data).cast("B")
        n = len(src)
        head = -(self._handed + self._fill) % ALIGNMENT
        if n - head < _RETAINED_MIN_BYTES or (address + head) % ALIGNMENT:
            return self._copy_in(src, address)
        self._copy_in(src[:head], address)
        if self._fill:
            self._hand_off()  # the position is aligned now: no tail to carry
        middle = (n - head) // ALIGNMENT * ALIGNMENT
        self._queue(src[head : head + middle], middle)
        self._copy_in(src[head + middle :], address + head + middle)
        return n

    def reserve(self, n: int) -> memoryview | None:
        """A writable view of the file's next ``n`` bytes, to fill and then :meth:`commit`.

        Lets a producer (the AES-GCM encryptor) write straight into the
        aligned buffer instead of into its own and then copying.  ``None`` if
        ``n`` cannot fit in one buffer; use :meth:`write` then.
        """
        self._check()
        if n > self._size - ALIGNMENT:
            return None
        if self._view is None:
            self._take_buffer()
        elif self._size - self._fill < n:
            self._hand_off()
        assert self._view is not None
        self._reserved = n
        return self._view[self._fill : self._fill + n]

    def commit(self, n: int) -> None:
        """Count the first ``n`` bytes of the last :meth:`reserve` as written."""
        if not 0 <= n <= self._reserved:
            raise ValueError(f"commit({n}) exceeds the {self._reserved} bytes reserved")
        self._fill += n
        self._reserved = 0

    def flush(self) -> None:
        """Raise a background failure, if any (a partial block stays buffered until finish)."""
        self._check()

    def finish(self) -> None:
        """Write everything still buffered and stop the thread; raise any write failure."""
        if self._state == "finished":
            return
        if self._state != "open" and self._error is None:
            raise ValueError(f"finish of an {self._state} DirectFile")
        self._stop_thread()  # first: even a failed file must not leave its thread behind
        try:
            self._check()  # a failure of the thread's writes, the last ones included
            if self._fill:
                assert self._view is not None
                aligned = self._fill - self._fill % ALIGNMENT
                self._write(self._view[:aligned])
                if aligned < self._fill:  # the last partial block cannot go direct
                    if self._direct:
                        _disable_direct_io(self._fd)
                        self._direct = False
                    _write_all(self._fd, self._view[aligned : self._fill])
        except BaseException as exc:
            self._error = self._error or exc
            self._state = "failed"
            self._release()
            raise
        self._state = "finished"
        self._release(reuse=True)

    def close(self) -> None:
        """:meth:`finish` if still open (file-object protocol)."""
        if self._state == "open":
            self.finish()

    def abort(self) -> None:
        """Stop without writing what is buffered (the caller discards the file)."""
        if self._state == "open":
            self._state = "aborted"
        self._stop_thread()
        self._release(reuse=self._error is None)

    # -- internals -------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            self._state = "failed"
            message = (
                f"writing the checkpoint file failed in the background ({self._error!r}); the "
                "file is incomplete and will not be committed"
            )
            # The cause's errno on the error itself: it survives pickling (a process
            # saver's child sends its errors to the parent without their __cause__).
            code = getattr(self._error, "errno", None)
            raise (OSError(code, message) if code else OSError(message)) from self._error
        if self._state != "open":
            raise ValueError(f"write to a {self._state} DirectFile")

    def _take_buffer(self) -> None:
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if len(self._buffers) <= _QUEUE_DEPTH:
                buf = _new_or_spare(self._size)
                self._buffers.append(buf)
            else:
                buf = self._free.get()  # wait for the thread to finish one
        self._current, self._view, self._fill = buf, memoryview(buf), 0
        # The mapping's address, for GIL-free copies (the temporary export
        # ends at once; the mapping lives as long as ``buf``).
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def _queue(self, buf: mmap.mmap | memoryview, n: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="torchaux-direct-io", daemon=True
            )
            self._thread.start()
        self._todo.put((buf, n))
        self._handed += n

    def _hand_off(self) -> None:
        """Queue the current buffer's aligned bytes; carry the rest (< 4 KiB) to a new buffer."""
        assert self._current is not None and self._view is not None
        aligned = self._fill - self._fill % ALIGNMENT
        tail = bytes(self._view[aligned : self._fill])
        self._view.release()
        current = self._current
        self._current, self._view, self._fill = None, None, 0
        self._queue(current, aligned)
        self._check()
        if tail:
            self._take_buffer()
            assert self._view is not None
            self._view[: len(tail)] = tail
            self._fill = len(tail)

    def _run(self) -> None:
        with counted():
            self._drain()

    def _drain(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, n = item
            if self._error is None:  # after a failure, only recycle buffers
                try:
                    with memoryview(buf) as view:
                        self._write(view[:n])
                except BaseException as exc:  # noqa: BLE001 - raised by the producer's next call
                    self._error = exc
            if isinstance(buf, memoryview):
                buf.release()  # the caller's (write_retained): never reused here
            else:
                self._free.put(buf)

    def _write(self, view: memoryview) -> None:
        if not view:
            return
        try:
            _write_all(self._fd, view)
        except OSError as exc:
            # A file system may accept the flag yet refuse our alignment; that
            # can only show on the first write, so nothing is written yet.
            if exc.errno != errno.EINVAL or not self._direct or os.lseek(self._fd, 0, 1):
                raise
            _disable_direct_io(self._fd)
            self._direct = False
            _write_all(self._fd, view)

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._todo.put(None)
            thread.join()

    def _release(self, reuse: bool = False) -> None:
        if self._view is not None:
            self._view.release()
        self._current, self._view = None, None
        if reuse:
            _keep_spares(self._size, self._buffers)
        # Otherwise dropped, not closed: a failed write's traceback may still hold
        # a view of one (mmap.close would raise BufferError); memory goes with it.
        self._buffers.clear()
