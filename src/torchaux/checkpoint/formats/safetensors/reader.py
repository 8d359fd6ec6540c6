"""Strict reader of the safetensors format, and the format's dtype table.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes
of UTF-8 JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape",
"data_offsets"}, ...}``) and then the tensor bytes, C order, little-endian,
back to back.  The reader applies the checks of safetensors' own Rust
validator (``safetensors/src/tensor.rs``: header length limit, UTF-8, JSON,
offsets that tile the data region exactly, byte counts that match shape and
dtype, nothing after the last tensor) and a few stricter ones (no duplicate
JSON keys, no unknown entry fields, header must open with ``{``).  Every
violation is an :class:`~torchaux.errors.IntegrityError` that says what was
expected and what was found.  It is pure Python: nothing is memory-mapped and
every returned tensor owns its bytes.

The writer, the CRC and content sniffing live in
:mod:`torchaux.checkpoint.formats.safetensors.writer`, which re-exports
:func:`read_safetensors`.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import IO, Any

import torch

from torchaux.errors import IntegrityError, UnsupportedFormatError

__all__ = [
    "SAFETENSORS_DTYPES", "MAX_HEADER_BYTES", "METADATA_KEY", "read_safetensors", "safetensors_layout",
]

#: Largest header safetensors accepts (``MAX_HEADER_SIZE`` in tensor.rs).
MAX_HEADER_BYTES = 100_000_000
#: Reserved header key of the metadata object (never a tensor name).
METADATA_KEY = "__metadata__"

# safetensors dtype names that torch can hold, in the order of safetensors'
# ``Dtype`` enum (0.8), which decides the data layout (largest first).  The
# order was checked against safetensors.torch.save 0.8, FNUZ, E8M0 and F4 included.
_FORMAT_NAMES: tuple[tuple[str, str], ...] = (
    ("BOOL", "bool"),
    ("F4", "float4_e2m1fn_x2"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
)

#: torch dtype -> safetensors dtype name, in safetensors' layout rank order
#: (ascending; the writer puts higher ranks first).  ``float4_e2m1fn_x2``
#: packs two F4 elements per byte, so its safetensors shape has a last
#: dimension twice as long.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, attr): name for name, attr in _FORMAT_NAMES if hasattr(torch, attr)
}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# Element widths in bits; F6 types are valid safetensors but have no torch dtype.
_BITS = {name: 8 * d.itemsize for d, name in SAFETENSORS_DTYPES.items()} | {
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_MAX_DIM = (1 << 63) - 1  # torch sizes are int64
_MAX_NUMEL = 1 << 64  # safetensors computes sizes in usize; more is ValidationOverflow


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


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
    header_len, entries, metadata = _parse_header(src)
    selected = _select(entries, names_filter)
    data_start = 8 + header_len
    tensors = {e.name: _load(src, data_start, e) for e in sorted(selected, key=lambda e: e.name)}
    return tensors, metadata


def safetensors_layout(source: Any) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate the header of ``source`` (``size`` and ``read(offset, n)``, e.g. a fill source).

    Returns ``([(name, dtype, shape, begin, end)], metadata)``, sorted by name, with
    file offsets; the checks and errors are :func:`read_safetensors`'.
    """
    header_len, entries, metadata = _parse_header(source)
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


# -- validation --------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise IntegrityError(f"safetensors header has the key {key!r} twice")
        out[key] = value
    return out


def _parse_header(src: _Source) -> tuple[int, list[_Entry], dict[str, str]]:
    if src.size < 8:
        raise IntegrityError(
            f"safetensors file too short: expected at least 8 bytes (the header length), "
            f"found {src.size}"
        )
    (n,) = struct.unpack("<Q", src.read(0, 8))
    if n > MAX_HEADER_BYTES:
        raise IntegrityError(
            f"safetensors header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
            "(corrupt length field, or not a safetensors file)"
        )
    if n > src.size - 8:
        raise IntegrityError(
            f"safetensors header length {n} runs past the end of the file: only "
            f"{src.size - 8} bytes follow the length field (truncated file?)"
        )
    raw = src.read(8, n)
    if raw[:1] != b"{":
        raise IntegrityError(f"safetensors header must start with '{{', found {raw[:1]!r}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except IntegrityError:
        raise
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"safetensors header is not valid UTF-8 (byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise IntegrityError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise IntegrityError(
            f"safetensors header must be a JSON object, found {type(header).__name__}"
        )
    metadata = _check_metadata(header.pop(METADATA_KEY, None))
    entries = [_check_entry(name, info) for name, info in header.items()]
    _check_layout(entries, src.size - 8 - n)
    return n, entries, metadata


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a \\udXXX escape
        raise IntegrityError(f"safetensors {what} {text!r} is not valid Unicode") from exc


def _check_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise IntegrityError(
            f"safetensors {METADATA_KEY!r} must be an object of strings, "
            f"found {type(metadata).__name__}"
        )
    for key, value in metadata.items():
        _check_text(key, "metadata key")
        if not isinstance(value, str):
            raise IntegrityError(
                f"safetensors metadata {key!r} must be a string, found {type(value).__name__}"
            )
        _check_text(value, "metadata value")
    return metadata


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(name: str, info: object) -> _Entry:
    _check_text(name, "tensor name")
    if not isinstance(info, dict):
        raise IntegrityError(f"tensor {name!r}: expected an object, found {type(info).__name__}")
    missing = [k for k in _ENTRY_KEYS if k not in info]
    extra = sorted(set(info) - set(_ENTRY_KEYS))
    if missing or extra:
        raise IntegrityError(
            f"tensor {name!r}: expected keys {list(_ENTRY_KEYS)}, "
            f"missing {missing}, unexpected {extra}"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise IntegrityError(
            f"tensor {name!r}: unknown dtype {_short(dtype)}; expected one of {sorted(_BITS)}"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise IntegrityError(
            f"tensor {name!r}: shape must be a list of integers in [0, 2**63), "
            f"found {_short(shape)}"
        )
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):  # fmt: skip
        raise IntegrityError(
            f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
            f"found {_short(offsets)}"
        )
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel > _MAX_NUMEL:
            raise IntegrityError(f"tensor {name!r}: shape {_short(shape)} overflows any file size")
    bits = numel * _BITS[dtype]
    if bits % 8:
        raise IntegrityError(
            f"tensor {name!r}: {numel} {dtype} elements fill {bits} bits, not whole bytes"
        )
    begin, end = offsets
    if end - begin != bits // 8:
        raise IntegrityError(
            f"tensor {name!r}: {dtype} of shape {_short(shape)} needs {bits // 8} bytes, "
            f"data_offsets {offsets} give {end - begin}"
        )
    return _Entry(name, dtype, tuple(shape), begin, end)


def _check_layout(entries: list[_Entry], data_size: int) -> None:
    """Offsets must tile ``[0, data_size)`` exactly: no gap, overlap or tail."""
    expected, previous = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.end > data_size:
            raise IntegrityError(
                f"tensor {e.name!r} ends at data byte {e.end} but the file holds only "
                f"{data_size} data bytes (truncated file?)"
            )
        if e.begin < expected:
            raise IntegrityError(
                f"tensor {e.name!r} starts at data byte {e.begin}, inside tensor "
                f"{previous!r} which ends at {expected} (overlapping offsets)"
            )
        if e.begin > expected:
            raise IntegrityError(
                f"tensor {e.name!r} starts at data byte {e.begin}; expected {expected}: "
                f"bytes {expected}..{e.begin} belong to no tensor"
            )
        expected, previous = e.end, e.name
    if expected != data_size:
        raise IntegrityError(
            f"safetensors data ends at byte {expected} but the file has {data_size - expected} "
            "more bytes (trailing garbage, or a gap after the last tensor)"
        )


def _select(
    entries: list[_Entry], names_filter: Callable[[str], bool] | Collection[str] | None
) -> list[_Entry]:
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


def _torch_shape(e: _Entry) -> tuple[torch.dtype, tuple[int, ...]]:
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


def _load(src: _Source, data_start: int, e: _Entry) -> torch.Tensor:
    dtype, shape = _torch_shape(e)
    out = torch.empty(e.end - e.begin, dtype=torch.uint8)
    if e.end > e.begin:
        dst = (ctypes.c_char * (e.end - e.begin)).from_address(out.data_ptr())
        src.readinto(data_start + e.begin, memoryview(dst).cast("B"))
    return out.view(dtype).view(shape)
