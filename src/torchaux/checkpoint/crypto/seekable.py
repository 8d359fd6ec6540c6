"""Random access to the verified plaintext of an encrypted file, for the parallel loader.

Chunks are independent (layout: :mod:`torchaux.checkpoint.crypto.envelope`):
chunk ``i`` is the record at ``H + i * full_record`` and holds plaintext bytes
``[i * C, (i + 1) * C)``.  So the file size alone gives the layout: ``k`` full
records and one shorter final record (none, or a full-sized last record, means
the file was cut).  :class:`EncryptedSource` checks the header and the key,
opens the final chunk at once (its length, after CBC padding, gives the
plaintext size), serves small reads (zip directory, pickle, safetensors
header) from a few cached chunks, and gives :func:`~torchaux.checkpoint.formats.fill.fill`
one job per chunk: every chunk of the file is opened and verified, also those
that hold no tensor byte, so a change anywhere fails the load exactly as the
streaming :class:`~torchaux.checkpoint.crypto.reader.DecryptingReader` fails.

A job reads its record with ``os.preadv`` and, in AES-GCM, decrypts straight
into the tensor when one tensor holds the whole chunk; otherwise (CBC modes
need 15 bytes of slack, and chunks that straddle records) it decrypts into a
per-thread buffer and copies.  Plaintext reaches a destination before its tag
is checked (GCM), but :func:`fill` raises before any tensor is returned, so a
caller never sees unauthenticated bytes.
"""

from __future__ import annotations

import bisect
import ctypes
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from torchaux.checkpoint.crypto import header as _header
from torchaux.checkpoint.crypto.chunks import cipher_for
from torchaux.checkpoint.crypto.header import check_key, read_header
from torchaux.checkpoint.formats.fill import Placed, Target
from torchaux.errors import IntegrityError

__all__ = ["EncryptedSource"]

# Decrypted chunks kept for small reads: the zip directory spans at most the
# last two, the pickle the first one or two; four avoid any re-decryption.
_CACHED_CHUNKS = 4


class EncryptedSource:
    """The plaintext of the encrypted file open as ``fd``, by offset (a fill source).

    Args:
        fd: the file, open for reading (not owned: keep it open while used).
        name: for messages.
        key, mode, expected_id: as for :class:`~torchaux.checkpoint.crypto.reader.DecryptingReader`.

    Raises:
        IntegrityError, DecryptionError, UnsupportedFormatError: as the
            streaming reader raises them (same messages).

    Example:
        >>> import tempfile
        >>> from torchaux.checkpoint.crypto.envelope import EncryptingWriter
        >>> with tempfile.TemporaryFile() as f:
        ...     with EncryptingWriter(f, bytes(16), "AES-GCM", chunk_size=16) as w:
        ...         _ = w.write(b"0123456789" * 5)
        ...     f.flush()
        ...     src = EncryptedSource(f.fileno(), "f", bytes(16), "AES-GCM")
        ...     src.size, src.read(14, 6)
        (50, b'456789')
    """

    def __init__(
        self, fd: int, name: str, key: bytes, mode: str | None, expected_id: bytes | None = None
    ) -> None:
        _header.require_cryptography()
        self.fd, self.name = fd, name
        with io.FileIO(fd, "rb", closefd=False) as raw:
            raw.seek(0)
            header = read_header(raw)
        check_key(key, header, mode)
        if expected_id is not None:
            _header.check_expected_identity(header, expected_id)
        #: The file's mode name and authenticated identity (None in version 1).
        self.encryption_mode, self.identity = header.mode.name, header.identity
        self.aead = header.mode.aead
        self._cipher = cipher_for(key, header)
        self._chunk = header.chunk_size
        self._start = len(header.raw)
        file_size = os.fstat(fd).st_size
        full = self._cipher.full_record
        k, last = divmod(file_size - self._start, full)
        if last == 0:  # the final record is always shorter than a full one
            raise IntegrityError(
                f"encrypted checkpoint is truncated: it ends at byte {file_size} of {name}, "
                f"after chunk {k - 1}, but the final chunk is missing (an interrupted save or "
                "incomplete copy); restore the file from a good copy"
            )
        self._final, self._last_record = k, last
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        final_plain = self._plain(k)
        self._final_plain = final_plain
        #: Plaintext bytes.
        self.size = k * self._chunk + len(final_plain)

    # -- one chunk -------------------------------------------------------------

    def _buffers(self) -> tuple[bytearray, bytearray]:
        local = self._local
        if not hasattr(local, "record"):
            local.record = bytearray(self._cipher.full_record)
            local.plain = bytearray(self._chunk + self._cipher.plain_slack)
        return local.record, local.plain

    def _open(self, index: int, out: memoryview | bytearray) -> int:
        """Read record ``index`` and verify-decrypt it into ``out``; its plaintext length."""
        final = index == self._final
        n = self._last_record if final else self._cipher.full_record
        at = self._start + index * self._cipher.full_record
        record = memoryview(self._buffers()[0])[:n]
        done = 0
        while done < n:
            got = os.preadv(self.fd, [record[done:]], at + done)
            if got <= 0:
                raise IntegrityError(
                    f"{self.name}: the encrypted file shrank while being read (record at byte "
                    f"{at}); restore it from a good copy"
                )
            done += got
        try:
            return self._cipher.open(index, final, record, out)  # type: ignore[arg-type]
        except IntegrityError as exc:  # DecryptionError included: add where it happened
            raise type(exc)(f"{exc} [record at byte {at} of {self.name}]") from None

    def _plain(self, index: int) -> bytes:
        """Chunk ``index``'s plaintext, through the small cache (for :meth:`read`)."""
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
        plain = self._buffers()[1]
        data = bytes(memoryview(plain)[: self._open(index, plain)])
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > _CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return data

    # -- the source protocol ----------------------------------------------------

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` verified plaintext bytes from ``offset``."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise IntegrityError(
                f"{self.name}: expected {n} bytes at plaintext byte {offset}, but the decrypted "
                f"file holds {self.size} bytes (truncated or damaged)"
            )
        parts, at, end = [], offset, offset + n
        while at < end:
            index, skip = divmod(at, self._chunk)
            piece = self._plain(index)[skip : skip + end - at]
            parts.append(piece)
            at += len(piece)
        return b"".join(parts)

    def peek(self, offset: int, n: int) -> bytes:
        """``n`` plaintext bytes from ``offset`` *not yet authenticated* (layout planning only).

        Local zip headers sit in every chunk; opening a whole chunk for 30
        bytes would decrypt the file twice.  This decrypts just the blocks
        asked for (GCM: the CTR keystream from counter 2 + block; CBC: from
        the previous ciphertext block).  Callers must run :func:`fill` over the
        source, which verifies every chunk, before they return anything.
        """
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        if offset < 0 or n < 0 or offset + n > self.size:
            return self.read(offset, n)  # raises the out-of-range error
        parts, at, end = [], offset, offset + n
        while at < end:
            index, skip = divmod(at, self._chunk)
            take = min(end - at, self._chunk - skip)
            with self._lock:
                cached = self._cache.get(index)
            if cached is not None or index == self._final:
                parts.append(self._plain(index)[skip : skip + take])
            else:
                first, last = skip // 16, (skip + take - 1) // 16
                base = self._start + index * self._cipher.full_record
                if self.aead:  # ciphertext at the record start; J0 = nonce || 1, data from 2
                    data = os.pread(self.fd, 16 * (last - first + 1), base + 16 * first)
                    nonce = self._cipher._prefix + index.to_bytes(8, "big")  # type: ignore[attr-defined]
                    mode: Any = modes.CTR(nonce + (2 + first).to_bytes(4, "big"))
                else:  # record = IV || blocks: block j decrypts with block j - 1 as IV
                    data = os.pread(self.fd, 16 * (last - first + 2), base + 16 * first)
                    mode, data = modes.CBC(data[:16]), data[16:]
                plain = Cipher(self._cipher._algorithm, mode).decryptor().update(data)  # type: ignore[attr-defined]
                parts.append(plain[skip - 16 * first : skip - 16 * first + take])
            at += take
        return b"".join(parts)

    def jobs(self, targets: Sequence[Target]) -> list[Callable[[], list[Placed]]]:
        """One job per chunk of the file (every chunk is verified), scattering into ``targets``."""
        order = sorted(range(len(targets)), key=lambda i: targets[i].offset)
        starts = [targets[i].offset for i in order]

        def job(index: int) -> list[Placed]:
            lo = index * self._chunk
            hi = lo + (len(self._final_plain) if index == self._final else self._chunk)
            # Targets overlapping [lo, hi): those starting before hi, not ending before lo.
            first = max(0, bisect.bisect_right(starts, lo) - 1)
            hits = []
            for j in range(first, bisect.bisect_left(starts, hi)):
                t = targets[order[j]]
                if t.offset < hi and t.offset + len(t.view) > lo and len(t.view):
                    hits.append(order[j])
            if len(hits) == 1 and self.aead and index != self._final:
                t = targets[hits[0]]
                if t.offset <= lo and hi <= t.offset + len(t.view):
                    view = t.view[lo - t.offset : hi - t.offset]
                    self._open(index, view)  # GCM writes exactly n bytes: straight in
                    return [(hits[0], lo - t.offset, view)]
            if index == self._final:
                plain = memoryview(self._final_plain)
            else:
                buffer = self._buffers()[1]
                plain = memoryview(buffer)[: self._open(index, buffer)]
            placed = []
            for i in hits:
                t = targets[i]
                a, b = max(lo, t.offset), min(hi, t.offset + len(t.view))
                dst = t.view[a - t.offset : b - t.offset]
                _copy(dst, plain[a - lo : b - lo])
                placed.append((i, a - t.offset, dst))
            return placed

        return [lambda index=index: job(index) for index in range(self._final + 1)]


_memmove = ctypes.memmove  # a foreign call: releases the GIL during the copy
_LARGE_COPY = 1 << 16  # below this, a memoryview copy costs less than the ctypes call


def _copy(dst: memoryview, src: memoryview) -> None:
    if len(dst) < _LARGE_COPY:
        dst[:] = src
        return
    d = (ctypes.c_char * len(dst)).from_buffer(dst)
    s = (ctypes.c_char * len(src)).from_buffer_copy(src) if src.readonly else (
        ctypes.c_char * len(src)
    ).from_buffer(src)
    _memmove(d, s, len(dst))
