"""The safetensors header: its dtype table, and the strict parser the reader and loader share.

The checks are those of safetensors' own Rust validator
(``safetensors/src/tensor.rs``: header length limit, UTF-8, JSON, offsets that
tile the data region exactly, byte counts that match shape and dtype, nothing
after the last tensor) and a few stricter ones (no duplicate JSON keys, no
unknown entry fields, header must open with ``{``).  Every violation is an
:class:`~torchaux.errors.IntegrityError` that says what was expected and what
was found.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from torchaux.errors import IntegrityError

__all__ = ["SAFETENSORS_DTYPES", "MAX_HEADER_BYTES", "METADATA_KEY", "Entry", "parse_header"]


class Readable(Protocol):
    """What the parser reads from: a size and positioned reads."""

    size: int

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset``."""


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
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


# -- validation --------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise IntegrityError(f"safetensors header has the key {key!r} twice")
        out[key] = value
    return out


def parse_header(src: Readable) -> tuple[int, list[Entry], dict[str, str]]:
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


def _check_entry(name: str, info: object) -> Entry:
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
    return Entry(name, dtype, tuple(shape), begin, end)


def _check_layout(entries: list[Entry], data_size: int) -> None:
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
