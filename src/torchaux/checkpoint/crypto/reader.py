"""The decrypting half of :mod:`torchaux.checkpoint.crypto.envelope`: a read-only file object.

:class:`DecryptingReader` checks the header and the key, then reads records
ahead, opens them on a few threads and hands out verified plaintext in order
(layout: ``crypto`` module docstring).  Only ``crypto`` re-exports it; import
it from there.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import IO, Any

from torchaux.checkpoint.crypto import header as _header
from torchaux.checkpoint.crypto.chunks import cipher_for
from torchaux.checkpoint.crypto.header import check_key, read_header
from torchaux.checkpoint.crypto.pipeline import OrderedPipeline, check_workers, default_workers
from torchaux.checkpoint.crypto.writer import write_all
from torchaux.errors import IntegrityError

__all__ = ["DecryptingReader", "decrypt_stream"]

_ALL_KEY_SIZES = (16, 24, 32)


class DecryptingReader(io.RawIOBase):
    """A read-only binary file of the verified plaintext of an encrypted stream.

    The header is read and checked (magic, CRC, fields, then the key) when the
    reader is made.  Records are read ahead and opened on ``workers``
    threads; each chunk is verified before any of its bytes are returned.
    A truncated stream raises only when the reader reaches the missing part,
    so bytes read before that are authentic but incomplete: use the result
    only after a read returned ``b""`` without raising.  ``raw`` is never
    closed.

    Args:
        raw: binary file object positioned at the header (``read`` or ``readinto``).
        key: the key the stream was written with.
        mode: the mode the caller expects; ``None`` accepts the file's mode.
        workers: decryption threads; ``None``: 1 for AES-GCM, else one per
            core (at most 8).
        expected_id: the identity (``str``/``bytes``) the file must carry in
            its authenticated header (``EncryptingWriter(identity=...)``); a
            different or missing identity raises :class:`DecryptionError`.

    Raises:
        TypeError, ValueError: bad ``key``/``mode``/``workers`` (before any I/O).
        IntegrityError: not an encrypted checkpoint, damaged or truncated data.
        DecryptionError: wrong key, other mode, tampered data, or not the
            expected identity.
        UnsupportedFormatError: written by a newer torchaux.

    Example:
        >>> from torchaux.checkpoint.crypto.envelope import EncryptingWriter
        >>> buf = io.BytesIO()
        >>> with EncryptingWriter(buf, bytes(16), "AES-CBC", chunk_size=16) as w:
        ...     _ = w.write(b"0123456789" * 5)
        >>> DecryptingReader(io.BytesIO(buf.getvalue()), bytes(16)).read(12)
        b'012345678901'
    """

    def __init__(
        self,
        raw: IO[bytes],
        key: bytes,
        *,
        mode: str | None = None,
        workers: int | None = None,
        expected_id: bytes | str | None = None,
    ) -> None:
        super().__init__()
        expected = None if expected_id is None else _header.check_identity(expected_id, "expected_id")
        if mode is not None:
            _header.validate_key(key, mode)
        elif not isinstance(key, bytes):
            raise TypeError(f"decryption key must be bytes; got {type(key).__name__}")
        elif len(key) not in _ALL_KEY_SIZES:
            raise ValueError(f"decryption key must be 16, 24 or 32 bytes; got {len(key)} bytes")
        n_workers = check_workers(workers)
        _header.require_cryptography()
        self._raw = raw
        header = read_header(raw)
        check_key(key, header, mode)
        if expected is not None:
            _header.check_expected_identity(header, expected)
        #: The authenticated identity of a version-2 file, else None.
        self.identity = header.identity
        #: The file's mode, e.g. ``"AES-GCM"``.
        self.encryption_mode = header.mode.name
        self._cipher = cipher_for(key, header)
        self._name = getattr(raw, "name", None)
        self._index = 0
        self._offset = len(header.raw)
        self._last_read = False  # the final record has been read from raw
        self._end = False  # the final chunk has been handed out
        self._error: Exception | None = None
        self._current = memoryview(b"")
        self._current_buffer: bytearray | None = None
        self._spare_records: list[bytearray] = []
        self._spare_plain: list[bytearray] = []
        self._pipeline = OrderedPipeline(n_workers or default_workers(header.mode.aead))

    def readable(self) -> bool:
        """True."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Copy up to ``len(buffer)`` verified bytes into ``buffer``; 0 at the end."""
        view = memoryview(buffer).cast("B")
        while not self._current:
            if not self._next_chunk():
                return 0
        n = min(len(view), len(self._current))
        view[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` verified bytes (all remaining if negative); fewer only at the end."""
        if size is None or size < 0:
            return self.readall()
        out = bytearray()
        while len(out) < size and (self._current or self._next_chunk()):
            n = min(size - len(out), len(self._current))
            out += self._current[:n]
            self._current = self._current[n:]
        return bytes(out)

    def readall(self) -> bytes:
        """Every remaining verified byte."""
        return b"".join(bytes(chunk) for chunk in self._chunks())

    def close(self) -> None:
        """Stop the worker threads and drop buffers; ``raw`` stays open."""
        pipeline = getattr(self, "_pipeline", None)  # absent if __init__ raised
        if pipeline is not None:
            pipeline.close()
        self._current = memoryview(b"")
        self._current_buffer = None
        super().close()

    def _chunks(self) -> Iterator[memoryview]:
        """Yield the remaining plaintext chunk by chunk (views valid until the next step)."""
        while self._current or self._next_chunk():
            chunk, self._current = self._current, memoryview(b"")
            yield chunk

    def _next_chunk(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on a closed DecryptingReader")
        if self._error is not None:
            raise self._error
        if self._current_buffer is not None:
            self._spare_plain.append(self._current_buffer)
            self._current_buffer = None
        if self._end:
            return False
        try:
            self._read_ahead()
            size, (record, plain, final) = self._pipeline.pop()
            self._spare_records.append(record)
            self._current, self._current_buffer = memoryview(plain)[:size], plain
            self._end = final
            self._read_ahead()  # keep the workers busy while the caller consumes
        except Exception as exc:
            self._error = exc
            self._current = memoryview(b"")
            self._pipeline.close()
            raise
        return True

    def _read_ahead(self) -> None:
        cipher = self._cipher
        while not self._last_read and not self._pipeline.full():
            record = self._spare_records.pop() if self._spare_records else None
            if record is None:
                record = bytearray(cipher.full_record)
            n = _read_into(self._raw, record)
            plain = self._spare_plain.pop() if self._spare_plain else None
            if plain is None:
                plain = bytearray(cipher.chunk_size + cipher.plain_slack)
            final = n < cipher.full_record
            self._last_read = final
            self._pipeline.submit(
                self._open,
                self._index,
                final,
                memoryview(record)[:n],
                plain,
                self._offset,
                context=(record, plain, final),
            )
            self._index += 1
            self._offset += n

    def _open(self, index: int, final: bool, record: memoryview, plain: bytearray, at: int) -> int:
        where = f"at byte {at}" + (f" of {self._name}" if self._name else "")
        if final and not record:
            raise IntegrityError(
                f"encrypted checkpoint is truncated: it ends {where}, after chunk {index - 1}, "
                "but the final chunk is missing (an interrupted save or incomplete copy); "
                "restore the file from a good copy"
            )
        try:
            return self._cipher.open(index, final, record, plain)
        except IntegrityError as exc:  # DecryptionError included: add where it happened
            raise type(exc)(f"{exc} [record {where}]") from None


def _read_into(raw: IO[bytes], buffer: bytearray) -> int:
    """Fill ``buffer`` from ``raw``; fewer bytes only at end of file."""
    view = memoryview(buffer)
    readinto = getattr(raw, "readinto", None)
    got = 0
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            data = raw.read(len(view) - got)
            n = len(data) if data else 0
            view[got : got + n] = data or b""
        if not n:
            break
        got += n
    return got


def decrypt_stream(
    raw: IO[bytes],
    out: IO[bytes],
    key: bytes,
    mode: str | None = None,
    *,
    workers: int | None = None,
    expected_id: bytes | str | None = None,
) -> int:
    """Decrypt all of ``raw`` into ``out``; return the plaintext byte count.

    Chunks are written to ``out`` as they verify, so after an exception
    ``out`` holds a verified but incomplete prefix: discard it.  Arguments
    and errors are those of :class:`DecryptingReader`.

    Example:
        >>> from torchaux.checkpoint.crypto.envelope import EncryptingWriter
        >>> enc = io.BytesIO()
        >>> with EncryptingWriter(enc, bytes(24), "AES-CBC", chunk_size=32) as w:
        ...     _ = w.write(bytes(100))
        >>> decrypt_stream(io.BytesIO(enc.getvalue()), io.BytesIO(), bytes(24), "AES-CBC")
        100
    """
    total = 0
    with DecryptingReader(raw, key, mode=mode, workers=workers, expected_id=expected_id) as reader:
        for chunk in reader._chunks():
            write_all(out, chunk)
            total += len(chunk)
    return total
