"""The encrypting half of :mod:`torchaux.checkpoint.crypto.envelope`: a write-only file object.

The zip writer streams a checkpoint into :class:`EncryptingWriter` with
writes of any size; the writer cuts them into chunks, seals the chunks on a
few threads and writes the records in order (layout: ``crypto`` module
docstring).  Only ``crypto`` re-exports it; import it from there.
"""

from __future__ import annotations

from concurrent.futures import Future
from types import TracebackType
from typing import IO, Any

from torchaux.checkpoint.crypto import header as _header
from torchaux.checkpoint.crypto.chunks import cipher_for
from torchaux.checkpoint.crypto.pipeline import (
    OrderedPipeline,
    check_workers,
    default_workers,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "EncryptingWriter", "write_all"]

#: Plaintext bytes per chunk.  4 MiB makes the per-chunk cost (48-80 bytes of
#: tag/IV, a cipher context, a thread hand-off: microseconds) negligible next
#: to the 3-50 ms a chunk takes to seal, while 2 x workers chunks in flight
#: stay a few tens of MiB.  Saves take theirs from ``TORCHAUX_ENCRYPTION_CHUNK_BYTES``.
DEFAULT_CHUNK_SIZE = 4 << 20


def _check_chunk_size(chunk_size: object) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int; got {type(chunk_size).__name__}")
    low, high = _header.MIN_CHUNK_SIZE, _header.MAX_CHUNK_SIZE
    if not low <= chunk_size <= high or chunk_size % 16:
        raise ValueError(
            f"chunk_size must be a multiple of 16 in [{low}, {high}]; got {chunk_size} "
            f"(the default is {DEFAULT_CHUNK_SIZE})"
        )
    return chunk_size


def write_all(raw: IO[bytes], data: memoryview) -> None:
    """Write all of ``data`` to ``raw``, looping over short writes."""
    while data:
        n = raw.write(data)
        if n is None:  # file objects that return nothing wrote everything
            return
        data = data[n:]


class EncryptingWriter:
    """A write-only binary file that encrypts everything written into ``raw``.

    The header is written at once; chunks are sealed as they fill, on
    ``workers`` threads, and written to ``raw`` in order.  :meth:`finish`
    (or :meth:`close`, or leaving a ``with`` block normally) seals the final
    chunk and flushes ``raw``; until then the output is incomplete and will
    not decrypt.  Leaving a ``with`` block by an exception, or any failed
    call, abandons the stream: no final chunk is ever written, so a broken
    save cannot pass for a complete one.  ``raw`` is never closed.

    A write holding at least ``workers`` whole chunks is sealed straight from
    the caller's buffer (no copy) and returns once those chunks are sealed;
    smaller writes are copied into chunk buffers and return at once.  Either
    way the caller's buffer is free when ``write`` returns.  Memory: at most
    ``2 * workers`` chunks in flight, each a record plus, if copied, its
    plaintext, so about ``(4 * workers + 3) * chunk_size`` bytes.

    Args:
        raw: binary file object, written with ``write`` and ``flush`` only.
        key: 16, 24 or 32 bytes (SM4-CBC: 16).
        mode: ``"AES-GCM"``, ``"AES-CBC"`` or ``"SM4-CBC"``.
        chunk_size: plaintext bytes per chunk, a multiple of 16.
        workers: encryption threads; ``None``: 1 for AES-GCM (one core already
            outruns storage), else one per core (at most 8).
        stable_buffers: promise that no buffer passed to :meth:`write` changes
            or is freed before :meth:`finish`/:meth:`close` returns; whole
            chunks are then sealed from it without waiting in ``write``, so
            the cipher threads never starve (staged checkpoints qualify).
        identity: the checkpoint's identity (``str``/``bytes``, at most 1024
            bytes, e.g. ``"run7/step1200"``), written into an authenticated
            version-2 header; ``None`` writes a version-1 header.

    Raises:
        TypeError, ValueError: bad key, mode, chunk size or worker count
            (checked before anything is written).

    Example:
        >>> import io
        >>> from torchaux.checkpoint.crypto.envelope import decrypt_stream
        >>> buf = io.BytesIO()
        >>> with EncryptingWriter(buf, bytes(32), "AES-GCM") as w:
        ...     _ = w.write(b"secret weights")
        >>> decrypt_stream(io.BytesIO(buf.getvalue()), out := io.BytesIO(), bytes(32))
        14
        >>> out.getvalue()
        b'secret weights'
    """

    def __init__(
        self,
        raw: IO[bytes],
        key: bytes,
        mode: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int | None = None,
        stable_buffers: bool = False,
        identity: bytes | str | None = None,
    ) -> None:
        _header.validate_key(key, mode)
        if identity is not None:
            identity = _header.check_identity(identity, "identity")
        # The caller promises not to change any buffer passed to write() until
        # finish()/close() returns (true for staged checkpoint buffers), so whole
        # chunks are sealed straight from it and write() returns without waiting:
        # the cipher threads always have queued work, which is what lets the CBC
        # modes use every core (a file-like write() must otherwise wait).
        self._stable = stable_buffers
        self._chunk = _check_chunk_size(chunk_size)
        n_workers = check_workers(workers) or default_workers(_header.MODES[mode].aead)
        header = _header.new_header(key, mode, self._chunk, identity)
        self._cipher = cipher_for(key, header)
        self._raw = raw
        self._state = "open"
        self._error: BaseException | None = None
        self._index = 0
        self._filled = 0
        self._pending: bytearray | None = None
        self._spare_records: list[bytearray] = []
        self._spare_plain: list[bytearray] = []
        self._pipeline = OrderedPipeline(n_workers)
        # One worker seals inline anyway; if raw lends its own buffer
        # (DirectFile.reserve), seal into it and skip copying every record.
        self._seal_in_place = (
            n_workers == 1
            and callable(getattr(raw, "reserve", None)) and callable(getattr(raw, "commit", None))
        )
        try:
            write_all(raw, memoryview(header.raw))
        except BaseException as exc:
            self._fail(exc)
            raise

    # -- io-like surface -------------------------------------------------
    def writable(self) -> bool:
        """True: this is a write-only stream."""
        return True

    def readable(self) -> bool:
        """False: this is a write-only stream."""
        return False

    def seekable(self) -> bool:
        """False: chunks are sealed in order."""
        return False

    @property
    def closed(self) -> bool:
        """Whether the stream is finished, failed or abandoned."""
        return self._state != "open"

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    # -- writing ---------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt ``data`` (any C-contiguous bytes-like object); return ``len`` in bytes."""
        self._check_open()
        view = memoryview(data).cast("B")
        try:
            self._consume(view)
        except BaseException as exc:
            self._fail(exc)
            raise
        return len(view)

    def _consume(self, view: memoryview) -> None:
        size, pos, n = self._chunk, 0, len(view)
        if self._filled:  # top up the partial chunk first
            pos = min(size - self._filled, n)
            self._copy(view[:pos])
        borrowed: list[Future[Any]] = []
        if self._stable:
            while n - pos >= size:
                self._submit(view[pos : pos + size], False, None)
                pos += size
        elif (n - pos) // size >= self._pipeline.workers:
            # Enough whole chunks to occupy every worker: seal them straight
            # from the caller's buffer (no copy), and return once they are sealed.
            while n - pos >= size:
                borrowed.append(self._submit(view[pos : pos + size], False, None))
                pos += size
        for start in range(pos, n, size):  # copied, so write() returns at once
            self._copy(view[start : start + size])
        for future in borrowed:
            future.result()

    def _copy(self, piece: memoryview) -> None:
        """Append ``piece`` (at most what fills the pending chunk) to the pending chunk."""
        end = self._filled + len(piece)
        self._pending_buffer()[self._filled : end] = piece
        self._filled = end
        if end == self._chunk:
            self._seal_pending(final=False)

    def _pending_buffer(self) -> bytearray:
        if self._pending is None:
            self._pending = self._spare_plain.pop() if self._spare_plain else bytearray(self._chunk)
        return self._pending

    def _seal_pending(self, *, final: bool) -> None:
        buffer = self._pending_buffer()
        filled, self._pending, self._filled = self._filled, None, 0
        self._submit(memoryview(buffer)[:filled], final, buffer)

    def _submit(self, src: memoryview, final: bool, owned: bytearray | None) -> Future[Any]:
        while self._pipeline.full():
            self._write_oldest()
        if self._seal_in_place:
            done = self._seal_into_raw(src, final)
            if owned is not None:  # sealed already: its plaintext buffer is free
                self._spare_plain.append(owned)
            return done
        out = self._spare_records.pop() if self._spare_records else None
        if out is None:
            out = bytearray(self._cipher.full_record)
        iv = _header.random_bytes(self._cipher.iv_size) if self._cipher.iv_size else b""
        index, self._index = self._index, self._index + 1
        return self._pipeline.submit(
            self._cipher.seal, index, final, src, out, iv, context=(out, owned)
        )

    def _seal_into_raw(self, src: memoryview, final: bool) -> Future[Any]:
        """Seal one chunk on this thread straight into ``raw``'s buffer (no record copy)."""
        record = self._cipher.record_size(len(src))
        iv = _header.random_bytes(self._cipher.iv_size) if self._cipher.iv_size else b""
        out = self._raw.reserve(record)  # type: ignore[attr-defined]
        if out is None:  # does not fit one buffer: seal aside and write
            buffer = bytearray(record)
            out = memoryview(buffer)
            size = self._cipher.seal(self._next_index(), final, src, buffer, iv)
            write_all(self._raw, out[:size])
        else:
            with out:
                size = self._cipher.seal(self._next_index(), final, src, out, iv)  # type: ignore[arg-type]
            self._raw.commit(size)  # type: ignore[attr-defined]
        done: Future[Any] = Future()
        done.set_result(size)
        return done

    def _next_index(self) -> int:
        index, self._index = self._index, self._index + 1
        return index

    def _write_oldest(self) -> None:
        size, (out, owned) = self._pipeline.pop()
        write_all(self._raw, memoryview(out)[:size])
        self._spare_records.append(out)
        if owned is not None:
            self._spare_plain.append(owned)

    def flush(self) -> None:
        """Write every sealed chunk to ``raw`` and flush it (a partial chunk stays buffered)."""
        if self._state == "finished":
            return
        self._check_open()
        try:
            while self._pipeline:
                self._write_oldest()
            self._raw.flush()
        except BaseException as exc:
            self._fail(exc)
            raise

    def finish(self) -> None:
        """Seal the final chunk, write everything and flush ``raw`` (idempotent)."""
        if self._state == "finished":
            return
        self._check_open()
        try:
            self._seal_pending(final=True)
        except BaseException as exc:
            self._fail(exc)
            raise
        self.flush()  # writes every sealed chunk; fails the writer on error
        self._state = "finished"
        self._release()

    def close(self) -> None:
        """:meth:`finish` if still open; otherwise only release threads and buffers."""
        if self._state == "open":
            self.finish()
        self._release()

    def abort(self) -> None:
        """Abandon the stream without a final chunk (the output will not decrypt)."""
        if self._state == "open":
            self._state = "aborted"
        self._release()

    def _fail(self, exc: BaseException) -> None:
        self._state, self._error = "failed", exc
        self._release()

    def _release(self) -> None:
        self._pipeline.close()
        self._spare_records.clear()
        self._spare_plain.clear()
        self._pending = None

    def _check_open(self) -> None:
        if self._state == "open":
            return
        if self._state == "failed":
            raise ValueError(
                f"EncryptingWriter failed earlier ({self._error!r}); its output has no final "
                "chunk and will not decrypt; start the save again with a new writer"
            ) from self._error
        raise ValueError(f"I/O operation on a {self._state} EncryptingWriter")
