"""One ``torch.save`` chunk of a DCP data file, read without ``torch.load``'s copy.

DCP stores each tensor chunk as a ``torch.save`` archive at an offset of a
data file.  ``torch.load`` copies the payload into a new storage, which the
loader then copies into the destination: two copies, the first into fresh
memory (page faults).  Here the layout comes from a ``map_location="meta"``
load (``weights_only``: no payload read, no code run) and the payload's
offset from the archive's directory, so

* :func:`chunk_tensor` views the payload inside a buffer already read, and
* :func:`read_into` reads the payload from the file straight into the
  destination tensor, hashing the chunk's bytes in order on the way.
"""

from __future__ import annotations

import ctypes
import io
import os
from typing import Any

import torch

from torchaux.distributed.checksums import HashingWriter
from torchaux.errors import IntegrityError, UnsupportedFormatError

__all__ = ["BufferFile", "chunk_tensor", "read_into"]

# Bytes read once at each end of a chunk for parsing its archive: torch.save
# puts data.pkl and small records before the payload and the version records
# and the zip directory (under 1 KiB for one tensor) after it.
_EDGE = 64 << 10


class BufferFile(io.RawIOBase):
    """A read-only, seekable file over a buffer (no copy of the whole buffer)."""

    def __init__(self, view: memoryview | bytearray) -> None:
        self._view = memoryview(view)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._pos += n
        return n


def chunk_tensor(data: memoryview | bytearray) -> torch.Tensor:
    """The tensor of one ``torch.save`` chunk, as a view of ``data`` where possible.

    ``torch.load`` copies the payload into a new storage (a 32 MiB chunk read
    at ~0.3 GB/s on this project's 2-core VM, 2026-12-02); here the layout
    comes from a ``map_location="meta"`` load (``weights_only``, no payload
    read) and the payload offset from the archive's directory, and the tensor
    is a view of ``data``, which must outlive it.  Anything else (big-endian
    archives, several storages) goes through ``torch.load``.

    >>> import io
    >>> b = io.BytesIO(); torch.save(torch.arange(6.0).view(2, 3)[:, 1:], b)
    >>> chunk_tensor(b.getbuffer()).tolist()
    [[1.0, 2.0], [4.0, 5.0]]
    """
    if memoryview(data).readonly:
        raise ValueError("chunk_tensor needs a writable buffer (the tensor is a view of it)")
    meta = torch.load(BufferFile(data), map_location="meta", weights_only=True)
    if not isinstance(meta, torch.Tensor) or type(meta) is not torch.Tensor:
        raise UnsupportedFormatError(f"a tensor chunk holds a {type(meta).__name__}")
    archive = torch._C.PyTorchFileReader(BufferFile(data))
    records = set(archive.get_all_records())
    big_endian = "byteorder" in records and bytes(archive.get_record("byteorder")) != b"little"
    if big_endian or sum(r.startswith("data/") for r in records) != 1 or "data/0" not in records:
        return torch.load(BufferFile(data), map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    start = archive.get_record_offset("data/0")
    nbytes = meta.untyped_storage().nbytes()
    if start + nbytes > len(data):
        raise IntegrityError(f"the payload needs {start + nbytes} bytes, the chunk has {len(data)}")
    flat = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=start) if nbytes else (
        torch.empty(0, dtype=torch.uint8))
    return flat.view(meta.dtype).as_strided(meta.size(), meta.stride(), meta.storage_offset())


class _Window(io.RawIOBase):
    """``[start, start + length)`` of a file descriptor as a read-only seekable file.

    The first and last :data:`_EDGE` bytes are read once and served from
    memory: parsing the archive (records before the payload, the directory
    after it) then costs two reads instead of one per zip structure.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd, self._start, self._length, self._pos = fd, start, length, 0
        self._head = self._pread(0, min(length, _EDGE))
        tail_at = max(0, length - _EDGE)
        self._tail_at, self._tail = tail_at, self._pread(tail_at, length - tail_at)

    def _pread(self, offset: int, n: int) -> bytes:
        return os.pread(self._fd, n, self._start + offset) if n else b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._length)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        end = self._pos + want
        if end <= len(self._head):
            view[:want] = self._head[self._pos : end]
        elif self._pos >= self._tail_at:
            view[:want] = self._tail[self._pos - self._tail_at : end - self._tail_at]
        elif want:
            want = os.preadv(self._fd, [view[:want]], self._start + self._pos)
        self._pos += want
        return want


class _Null:
    def write(self, data: Any) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise IntegrityError(f"the data file ends {len(view) - got} bytes early")
        got += n


def read_into(fd: int, start: int, length: int, dest: torch.Tensor, algorithm: str | None) -> int | None:
    """Read the chunk ``[start, start + length)`` of ``fd`` straight into ``dest``.

    Returns the chunk's checksum under ``algorithm`` (0 when ``None``), or
    ``None`` without writing anything when the chunk is not one contiguous
    little-endian tensor of ``dest``'s shape and dtype or ``dest`` is not
    contiguous CPU memory (read it the general way then).
    """
    if dest.device.type != "cpu" or not dest.is_contiguous() or not hasattr(os, "preadv"):
        return None
    window = _Window(fd, start, length)
    meta = torch.load(window, map_location="meta", weights_only=True)
    window.seek(0)
    if type(meta) is not torch.Tensor or meta.dtype != dest.dtype or meta.size() != dest.size():
        return None
    nbytes = dest.numel() * dest.element_size()
    if not meta.is_contiguous() or meta.storage_offset() or meta.untyped_storage().nbytes() != nbytes:
        return None
    archive = torch._C.PyTorchFileReader(window)
    records = set(archive.get_all_records())
    if "byteorder" in records and bytes(archive.get_record("byteorder")) != b"little":
        return None
    if sum(r.startswith("data/") for r in records) != 1 or "data/0" not in records:
        return None
    payload = archive.get_record_offset("data/0")
    if payload + nbytes > length or nbytes == 0:
        return None
    hasher = HashingWriter(_Null(), algorithm) if algorithm is not None else None  # type: ignore[arg-type]
    head = memoryview(bytearray(payload))
    tail = memoryview(bytearray(length - payload - nbytes))
    body = memoryview((ctypes.c_char * nbytes).from_address(dest.data_ptr())).cast("B")
    for view, offset in ((head, 0), (body, payload), (tail, payload + nbytes)):
        _pread_all(fd, view, start + offset)
        if hasher is not None:
            hasher.write(view)
    return hasher.digest_and_reset() if hasher is not None else 0
