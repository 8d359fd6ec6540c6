"""Tensor chunks written to the disk straight from their staged buffers.

DCP stores each tensor chunk as a small torch.save archive
(``FileSystemWriter``'s layout, which torchaux keeps).  Through a direct-I/O
file the archive's payload would first be copied into the file's aligned
buffers: a memcpy of the whole shard at every save, 27% of a rank's writer
CPU (py-spy of 20 saves of a 127 MiB FSDP2 shard, 2026-12-03).  For a chunk
of at least :data:`IN_PLACE_MIN_BYTES`, the archive is written with storage
alignment 4096 (``torch.utils.serialization.config.save.storage_alignment``,
recorded in the archive's ``.storage_alignment``; torch.load honours it) and
zero padding before the chunk puts the payload at a file offset congruent to
its memory address modulo 4096, so
:meth:`~torchaux.checkpoint.storage.direct_io.DirectFile.write_retained`
sends it to the disk in place.  The padding lies between chunks, outside
every chunk's ``(offset, length)``, which is all a DCP reader reads
(docs/FORMAT.md §4).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any

import torch

from torchaux.distributed.checksums import HashingWriter

__all__ = ["IN_PLACE_MIN_BYTES", "buffer_address", "eligible", "pad_for", "write_in_place"]

#: Chunks from this size on are written in place (below it the 4 KiB of
#: alignment padding would cost more than the copy saves).
IN_PLACE_MIN_BYTES = 1 << 20
# O_DIRECT's alignment (storage/direct_io.py ALIGNMENT).
_ALIGNMENT = 4096


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer (Include/pybuffer.h), read-only use: buf is the address.
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def buffer_address(data: Any) -> int:
    """The address of the first byte of a buffer (read-only ones too).

    >>> b = bytearray(b"abc")
    >>> buffer_address(b) == ctypes.addressof(ctypes.c_char.from_buffer(b))
    True
    """
    view = _PyBuffer()
    _get_buffer(data, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises BufferError on failure
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


def eligible(out: HashingWriter, data: object) -> bool:
    """Whether ``data`` (a chunk DCP resolved) can be written in place to ``out``."""
    if not isinstance(data, torch.Tensor) or not out.can_retain:
        return False
    nbytes = data.numel() * data.element_size()
    return (
        nbytes >= IN_PLACE_MIN_BYTES and data.device.type == "cpu" and data.is_contiguous()
        and data.untyped_storage().nbytes() == nbytes and not data.is_conj() and not data.is_neg()
        and type(data) is torch.Tensor
    )


def pad_for(out: HashingWriter, tensor: torch.Tensor) -> None:
    """Write zeros up to where ``tensor``'s chunk must start; they belong to no chunk."""
    pad = (tensor.data_ptr() - out.tell()) % _ALIGNMENT
    if pad:
        out.write(bytes(pad))
        out.digest_and_reset()


@contextlib.contextmanager
def _storage_alignment(alignment: int) -> Iterator[None]:
    # A per-thread setting in torch 2.13 (formats/torch_save/writer.py capture_options).
    from torch.utils.serialization import config

    previous = config.save.storage_alignment
    config.save.storage_alignment = alignment
    try:
        yield
    finally:
        config.save.storage_alignment = previous


class _Retaining:
    """What torch.save writes to: the tensor's own bytes go in place, the rest as usual."""

    def __init__(self, out: HashingWriter, tensor: torch.Tensor) -> None:
        self._out, self._tensor = out, tensor
        self._lo = tensor.data_ptr()
        self._hi = self._lo + tensor.numel() * tensor.element_size()

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if n >= IN_PLACE_MIN_BYTES:
            address = buffer_address(data)
            if self._lo <= address and address + n <= self._hi:
                # A view of our own that keeps the tensor alive until the file
                # has written it (a chunk DCP resolved may be a temporary).
                array = (ctypes.c_char * n).from_address(address)
                array._owner = self._tensor  # type: ignore[attr-defined]
                view = memoryview(array).cast("B")
                self._out.write_retained(view, address)
                return n
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()

    def writable(self) -> bool:
        return True


def write_in_place(out: HashingWriter, tensor: torch.Tensor) -> None:
    """``torch.save(tensor)`` into ``out`` with its payload sent in place (after :func:`pad_for`)."""
    with _storage_alignment(_ALIGNMENT):
        torch.save(tensor, _Retaining(out, tensor))  # type: ignore[arg-type]
