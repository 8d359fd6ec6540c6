"""Strict reader of the safetensors format (the header and dtype table: :mod:`.header`).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes
of UTF-8 JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape",
"data_offsets"}, ...}``) and then the tensor bytes, C order, little-endian,
back to back.  The header is validated by
:func:`~torchaux.checkpoint.formats.safetensors.header.parse_header` (the checks
of safetensors' own Rust validator and a few stricter ones); every violation is
an :class:`~torchaux.errors.IntegrityError`.  It is pure Python: nothing is memory-mapped and
every returned tensor owns its bytes.

The writer, the CRC and content sniffing live in
:mod:`torchaux.checkpoint.formats.safetensors.writer`, which re-exports
:func:`read_safetensors`.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Collection
from typing import IO, Any

import torch

from torchaux.checkpoint.formats.safetensors.header import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    SAFETENSORS_DTYPES,
    Entry,
    parse_header,
)
from torchaux.errors import IntegrityError, UnsupportedFormatError

_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

__all__ = [
    "SAFETENSORS_DTYPES", "MAX_HEADER_BYTES", "METADATA_KEY", "read_safetensors", "safetensors_layout",
]

class _Source:
    """Positioned reads from a bytes-like object or a seekable binary file."""

    def __init__(self, obj: bytes | bytearray | memoryview | IO[bytes]) -> None:
        self._file: IO[bytes] | None = None
        if not isinstance(obj, (bytes, bytearray, memoryview)):
            if not callable(getattr(obj, "read", None)):
                raise TypeError(
                    "read_safetensors expects bytes or a binary file object, "
                    f"got {type(obj).__name__}"
                )
            if not isinstance(obj.read(0), bytes):
                raise TypeError("read_safetensors needs a binary file object (open it with 'rb')")
            if callable(getattr(obj, "seekable", None)) and obj.seekable():
                self._file, self._base = obj, obj.tell()
                self.size = obj.seek(0, 2) - self._base
                return
            obj = obj.read()
        self._buf = memoryview(obj).cast("B")
        self.size = len(self._buf)

    def read(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, dst: memoryview) -> None:
        if self._file is None:
            dst[:] = self._buf[offset : offset + len(dst)]
            return
        self._file.seek(self._base + offset)
        done = 0
        while done < len(dst):
            got = _read_some(self._file, dst[done:])
            if not got:
                raise IntegrityError(
                    f"safetensors file ended at byte {offset + done}, expected "
                    f"{offset + len(dst)} bytes (did it shrink while being read?)"
                )
            done += got


def read_safetensors(
    source: bytes | bytearray | memoryview | IO[bytes],
    *,
    names_filter: Callable[[str], bool] | Collection[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate a safetensors file and return its tensors and metadata.

    The whole header is validated, and the data layout checked against the
    file size, before any tensor byte is read; a file object is read from its
    current position to its end.

    Args:
        source: the file's bytes, or a binary file object (seekable ones are
            read tensor by tensor, others are read whole first).
        names_filter: load only some tensors: a predicate on the name, or a
            collection of names (all of which must be in the file).

    Returns:
        ``(tensors, metadata)``: owned CPU tensors by name (sorted by name),
        and the ``__metadata__`` strings (empty if the file has none).

    Raises:
        IntegrityError: the file is truncated, has trailing bytes, or a header
            that is not valid safetensors.
        UnsupportedFormatError: a selected tensor is valid safetensors without
            a torch dtype (F6, or F4 with an odd last dimension).
        KeyError: ``names_filter`` names a tensor the file does not have.
        TypeError: ``source`` is not bytes or a binary file object.

    Example:
        >>> import json, struct
        >>> entry = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
        >>> header = json.dumps({"__metadata__": {"k": "v"}, "w": entry}).encode()
        >>> blob = struct.pack("<Q", len(header)) + header + bytes([7, 9])
        >>> tensors, metadata = read_safetensors(blob)
        >>> tensors["w"].tolist(), metadata
        ([7, 9], {'k': 'v'})
    """
    if sys.byteorder != "little":
        raise UnsupportedFormatError("reading safetensors needs a little-endian host")
    src = _Source(source)
    header_len, entries, metadata = parse_header(src)
    selected = _select(entries, names_filter)
    data_start = 8 + header_len
    tensors = {e.name: _load(src, data_start, e) for e in sorted(selected, key=lambda e: e.name)}
    return tensors, metadata


def safetensors_layout(source: Any) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate the header of ``source`` (``size`` and ``read(offset, n)``, e.g. a fill source).

    Returns ``([(name, dtype, shape, begin, end)], metadata)``, sorted by name, with
    file offsets; the checks and errors are :func:`read_safetensors`'.
    """
    header_len, entries, metadata = parse_header(source)
    data = 8 + header_len
    return [
        (e.name, *_torch_shape(e), data + e.begin, data + e.end)
        for e in sorted(entries, key=lambda e: e.name)
    ], metadata


def _read_some(f: IO[bytes], dst: memoryview) -> int:
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        return int(readinto(dst) or 0)
    chunk = f.read(len(dst))
    dst[: len(chunk)] = chunk
    return len(chunk)


def _select(
    entries: list[Entry], names_filter: Callable[[str], bool] | Collection[str] | None
) -> list[Entry]:
    if names_filter is None:
        return entries
    if callable(names_filter):
        return [e for e in entries if names_filter(e.name)]
    if isinstance(names_filter, str):
        raise TypeError("names_filter must be a collection of names or a predicate, not a str")
    wanted = set(names_filter)
    missing = wanted - {e.name for e in entries}
    if missing:
        raise KeyError(f"tensors not in the safetensors file: {sorted(missing)}")
    return [e for e in entries if e.name in wanted]


def _torch_shape(e: Entry) -> tuple[torch.dtype, tuple[int, ...]]:
    dtype = _TORCH_DTYPES.get(e.dtype)
    if dtype is None:
        raise UnsupportedFormatError(f"tensor {e.name!r}: dtype {e.dtype} has no torch equivalent")
    if e.dtype != "F4":
        return dtype, e.shape
    if not e.shape or e.shape[-1] % 2:
        raise UnsupportedFormatError(
            f"tensor {e.name!r}: F4 shape {list(e.shape)} needs an even last dimension to load "
            "as torch.float4_e2m1fn_x2 (two elements per byte)"
        )
    return dtype, (*e.shape[:-1], e.shape[-1] // 2)


def _load(src: _Source, data_start: int, e: Entry) -> torch.Tensor:
    dtype, shape = _torch_shape(e)
    out = torch.empty(e.end - e.begin, dtype=torch.uint8)
    if e.end > e.begin:
        dst = (ctypes.c_char * (e.end - e.begin)).from_address(out.data_ptr())
        src.readinto(data_start + e.begin, memoryview(dst).cast("B"))
    return out.view(dtype).view(shape)
