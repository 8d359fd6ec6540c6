"""The zip container of ``torch.save`` files, written without torch's miniz writer.

Why our own writer: torch's writer computes each record's CRC-32 with miniz's
table-driven routine (~0.6 GB/s on the reference machine), which was about two
thirds of the background writer's CPU time and competed with training for the
cores.  :func:`~torchaux.checkpoint.crc32.crc32` (zlib-ng's SIMD CRC-32) runs at
~32 GB/s there and releases the GIL, and records are written straight from the
staged buffers (no intermediate copy).

The layout reproduces what torch 2.13's ``PyTorchStreamWriter`` (miniz 3,
``MZ_ZIP_FLAG_WRITE_ZIP64``) emits, observed byte by byte and pinned by
tests/checkpoint/test_torch_zip.py against ``torch.save`` output:

* every member is STORED (method 0), DOS time/date 0, version fields 0, flag
  bit 11 (UTF-8 names) and, for non-empty members, bit 3 (a data descriptor
  follows the data; the local header's CRC and sizes are 0);
* the local header's extra field is an optional ZIP64 block (id 1) - present
  when the size or the header offset is >= 0xFFFFFFFF, holding
  ``[uncompressed size, 0]`` and/or ``[header offset]`` - followed by an
  ``"FB"`` block of ``'Z'`` bytes that puts the data at a multiple of the
  storage alignment (64), so ``torch.load(mmap=True)`` can map tensors in place;
* the data descriptor holds the CRC and both sizes, as 64-bit values when the
  member needed ZIP64;
* the central directory mirrors the headers, with 0xFFFFFFFF and a ZIP64
  block for values that overflow 32 bits; then a ZIP64 end record, its
  locator and the classic end record (always, as miniz does).

Only the first half of ``.data/serialization_id`` differs.  Its last 20
digits are, as in torch, c10's ``hash_combine`` over the CRC-32 of every
non-empty record in write order (zero-length records are left out); torch's first 20 digits hash the member names in the iteration
order of a C++ hash set, which cannot be reproduced portably, so ours combine
the CRC-32 of each member name instead.  Readers treat the id as opaque.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass
from typing import IO

import torch

from torchaux.checkpoint.cpu_time import counted
from torchaux.checkpoint.crc32 import BACKEND as crc32_backend
from torchaux.checkpoint.crc32 import crc32

__all__ = ["TorchZipWriter", "storage_view"]

_U32_MAX = 0xFFFFFFFF
_LOCAL_SIG = 0x04034B50
_CENTRAL_SIG = 0x02014B50
_DESCRIPTOR_SIG = 0x08074B50
_EOCD64_SIG = 0x06064B50
_EOCD64_LOCATOR_SIG = 0x07064B50
_EOCD_SIG = 0x06054B50
_FLAG_UTF8 = 0x0800
_FLAG_DESCRIPTOR = 0x0008
_LOCAL_HEADER_SIZE = 30
# "version made by" 0x031E (unix, 3.0) and "needed" 0x002D (4.5, ZIP64) are
# what miniz writes in the ZIP64 end record.
_EOCD64_MADE_BY = 0x031E
_EOCD64_NEEDED = 0x002D
# Chunk for CRC + write: large enough to amortise calls, small enough that the
# CRC of one chunk is still in cache when it is written.
_CHUNK = 16 << 20


# Members from this size on get their CRC computed on a second thread, but only
# with zlib's CRC (~4-6 GB/s: 8 MiB takes ~2 ms against a thread start's ~0.1 ms).
# At zlib-ng's ~32 GB/s the CRC adds ~3% to a 1 GB/s write in line, and a second
# thread would only take a core from training.
_CONCURRENT_CRC_BYTES = 8 << 20 if crc32_backend == "zlib" else 1 << 62


class _ConcurrentCrc:
    """``crc32(view)`` on its own thread (the CRC releases the GIL); :meth:`result` joins."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._value = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="torchaux-crc32", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with counted():
                self._value = crc32(self._view)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result() on the writer
            self._error = exc

    def result(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def storage_view(storage: torch.UntypedStorage) -> memoryview:
    """A zero-copy, read-only byte view of a CPU storage (keep ``storage`` alive).

    >>> s = torch.tensor([1, 2], dtype=torch.uint8).untyped_storage()
    >>> bytes(storage_view(s))
    b'\\x01\\x02'
    """
    n = storage.nbytes()
    if n == 0:
        return memoryview(b"")
    if storage.device.type != "cpu":
        raise ValueError(f"storage_view needs a CPU storage, got device {storage.device}")
    return memoryview((ctypes.c_char * n).from_address(storage.data_ptr())).cast("B").toreadonly()


def _hash_combine(seed: int, value: int) -> int:
    # Boost/c10 hash_combine on 64-bit integers (c10/util/hash.h).
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & mask)) & mask


@dataclass
class _Member:
    name: bytes
    offset: int
    size: int
    crc: int
    flags: int


class TorchZipWriter:
    """Streams records into a torch-layout zip archive.

    Args:
        fileobj: binary file object, positioned at 0 (nothing written yet).
        archive_name: top-level folder of every member (torch uses the file's
            stem, or ``"archive"`` for file objects).
        alignment: data alignment of each member (torch's storage alignment).
        compute_crc: write real CRC-32 values (``torch.serialization.get_crc32_options()``).

    Example:
        >>> import io, zipfile
        >>> buf = io.BytesIO()
        >>> w = TorchZipWriter(buf)
        >>> w.write_record("hello", memoryview(b"hi"))
        >>> w.finish()
        >>> zipfile.ZipFile(buf).read("archive/hello")
        b'hi'
    """

    def __init__(
        self,
        fileobj: IO[bytes],
        *,
        archive_name: str = "archive",
        alignment: int = 64,
        compute_crc: bool = True,
    ) -> None:
        if alignment < 1 or alignment > 0xFFFF:
            raise ValueError(f"alignment must be in 1..65535, got {alignment}")
        self._f = fileobj
        self._prefix = archive_name + "/"
        self._alignment = alignment
        self._crc = compute_crc
        self._pos = 0
        self._members: list[_Member] = []
        self._finished = False

    def _write(self, data: bytes | memoryview) -> None:
        # Raw (unbuffered) files may write less than asked, e.g. at most
        # 0x7ffff000 bytes per call on Linux (write(2) NOTES); loop until done.
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = self._f.write(view)
            if n is None:  # buffered and text-like objects write everything
                break
            if n <= 0:
                raise OSError(f"write returned {n} with {len(view)} bytes left to write")
            view = view[n:]
        self._pos += total

    def _write_data(self, view: memoryview, address: int | None) -> None:
        retained = getattr(self._f, "write_retained", None) if address is not None else None
        if retained is None:
            self._write(view)
            return
        retained(view, address)
        self._pos += len(view)

    def zero_copy_alignment(self) -> int | None:
        """The record alignment that lets the file object write staged buffers in place, if any."""
        return getattr(self._f, "RETAINED_ALIGNMENT", None)

    def write_record_skipped(self, name: str, size: int) -> None:
        """Append a member of ``size`` zero bytes with CRC 0 (torch.save under ``skip_data``).

        torch's ``write_record_metadata`` seeks past the data instead; the
        bytes read back are the same zeros, and this works without ``seek``.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        full, offset, flags, zip64 = self._begin(name, size)
        zeros = memoryview(bytes(min(size, _CHUNK)))
        for i in range(0, size, _CHUNK):
            self._write(zeros[: min(_CHUNK, size - i)])
        self._end(full, offset, size, 0, flags, zip64)

    def write_record(
        self, name: str, data: bytes | memoryview, *, address: int | None = None, crc: int | None = None
    ) -> None:
        """Append one member ``<archive>/<name>`` holding ``data``.

        ``address``: where ``data`` lives in memory, given when it stays alive
        and unchanged until the file is finished (a staged buffer); a file
        object with ``write_retained`` (:class:`~torchaux.checkpoint.storage.direct_io.DirectFile`)
        then writes it without copying it.  ``crc``: the CRC-32 of ``data``,
        already known (computed during staging): not computed again.
        """
        view = memoryview(data).cast("B")
        size = len(view)
        full, offset, flags, zip64 = self._begin(name, size)
        if crc is not None and self._crc:
            self._write_data(view, address)
            self._end(full, offset, size, crc, flags, zip64)
            return
        crc = 0
        # The CRC only goes into the data descriptor, after the data, so a large
        # member's CRC runs on a second thread while this one writes (copies or
        # encrypts) the same bytes: the two passes overlap instead of adding up.
        concurrent = _ConcurrentCrc(view) if self._crc and size >= _CONCURRENT_CRC_BYTES else None
        try:
            if concurrent is not None:
                # One call: a consumer that cuts its own chunks (the encrypting
                # writer) then splits a partial chunk once per member, not per piece.
                self._write_data(view, address)
            for i in range(0, size if concurrent is None else 0, _CHUNK):
                chunk = view[i : i + _CHUNK]
                if self._crc:
                    crc = crc32(chunk, crc)
                self._write_data(chunk, None if address is None else address + i)
        finally:
            if concurrent is not None:  # never leave a thread reading a buffer we give back
                crc = concurrent.result()
        self._end(full, offset, size, crc, flags, zip64)

    def _begin(self, name: str, size: int) -> tuple[bytes, int, int, bytes]:
        # The local header of a member of `size` bytes: (name, offset, flags, zip64 block).
        if self._finished:
            raise RuntimeError("TorchZipWriter.finish() was already called")
        full = (self._prefix + name).encode("utf-8")
        offset = self._pos
        zip64 = b""
        if size >= _U32_MAX or offset >= _U32_MAX:
            payload = b""
            if size >= _U32_MAX:
                payload += struct.pack("<QQ", size, 0)
            if offset >= _U32_MAX:
                payload += struct.pack("<Q", offset)
            zip64 = struct.pack("<HH", 1, len(payload)) + payload
        start = offset + _LOCAL_HEADER_SIZE + len(full) + len(zip64) + 4
        pad = -start % self._alignment
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
        header = struct.pack(
            "<IHHHHHIIIHH", _LOCAL_SIG, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra)
        )
        self._write(header + full + extra)
        return full, offset, flags, zip64

    def _end(self, full: bytes, offset: int, size: int, crc: int, flags: int, zip64: bytes) -> None:
        # The data descriptor (non-empty members only, as miniz) and the bookkeeping.
        if size:
            if zip64:
                self._write(struct.pack("<IIQQ", _DESCRIPTOR_SIG, crc, size, size))
            else:
                self._write(struct.pack("<IIII", _DESCRIPTOR_SIG, crc, size, size))
        self._members.append(_Member(full, offset, size, crc, flags))

    def finish(self) -> None:
        """Write the central directory and end records; flush the file object."""
        if self._finished:
            return
        self._finished = True
        cd_offset = self._pos
        for m in self._members:
            payload = b""
            size32 = m.size
            offset32 = m.offset
            if m.size >= _U32_MAX:
                payload += struct.pack("<QQ", m.size, m.size)
                size32 = _U32_MAX
            if m.offset >= _U32_MAX:
                payload += struct.pack("<Q", m.offset)
                offset32 = _U32_MAX
            extra = struct.pack("<HH", 1, len(payload)) + payload if payload else b""
            self._write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII", _CENTRAL_SIG, 0, 0, m.flags, 0, 0, 0, m.crc,
                    size32, size32, len(m.name), len(extra), 0, 0, 0, 0, offset32,
                )
                + m.name
                + extra
            )
        cd_size = self._pos - cd_offset
        n = len(self._members)
        eocd64_offset = self._pos
        self._write(
            struct.pack(
                "<IQHHIIQQQQ", _EOCD64_SIG, 44, _EOCD64_MADE_BY, _EOCD64_NEEDED, 0, 0,
                n, n, cd_size, cd_offset,
            )
        )
        self._write(struct.pack("<IIQI", _EOCD64_LOCATOR_SIG, 0, eocd64_offset, 1))
        self._write(
            struct.pack(
                "<IHHHHIIH", _EOCD_SIG, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                min(cd_size, _U32_MAX), min(cd_offset, _U32_MAX), 0,
            )
        )
        self._f.flush()

    def members(self) -> list[tuple[str, int, int]]:
        """``(full name, CRC-32, size)`` of every member written so far, in order."""
        return [(m.name.decode("utf-8"), m.crc, m.size) for m in self._members]

    def serialization_id(self) -> str:
        """40 decimal digits identifying the content written so far."""
        names = 0
        crcs = 0
        for m in self._members:
            names = _hash_combine(names, crc32(m.name))
            if m.size:
                # torch folds only non-empty records (PyTorchStreamWriter::writeRecord
                # returns early for size 0, before combine_uncomp_crc32_).
                crcs = _hash_combine(crcs, m.crc)
        return f"{names:020d}{crcs:020d}"
