"""Writer of the safetensors format from a staged :class:`Snapshot`.

The output is byte-identical to ``safetensors.torch.save`` (0.8) for the same
contiguous tensors: the 8-byte little-endian header length, compact JSON with
``__metadata__`` first, tensors ordered by safetensors' dtype rank (largest
first) then by name, the header padded with spaces to a multiple of 8, then
the data back to back.  Two deliberate differences: metadata keys are written
sorted (safetensors writes them in Rust ``HashMap`` order, which changes from
process to process), and non-contiguous tensors are packed instead of
rejected.  Tensors that share storage are written independently, since the
format has no aliasing.

``crc=True`` adds MindSpore's ``"crc_num"`` metadata (spec §4.2), so files
load with MindSpore's ``crc_check=True``.  The strict reader is in
:mod:`torchaux.checkpoint.formats.safetensors.reader`.
"""

from __future__ import annotations


import ctypes
import json
import struct
import sys
from collections.abc import Mapping
from typing import IO

import torch

from torchaux.checkpoint.crc32 import crc32
from torchaux.checkpoint.formats.safetensors.reader import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    SAFETENSORS_DTYPES,
    read_safetensors,
)
from torchaux.checkpoint.engine.staging import Snapshot
from torchaux.errors import IntegrityError

__all__ = [
    "write_safetensors",
    "check_safetensors_dtypes",
    "check_safetensors_metadata",
    "read_safetensors",
    "verify_crc",
    "safetensors_crc",
    "sniff_safetensors",
    "raw_bytes",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "CRC_METADATA_KEY",
]

#: Metadata key of MindSpore's CRC-32 (spec §4.2); its value is a decimal string.
CRC_METADATA_KEY = "crc_num"

# Bytes per write() call: bounded so that transform sinks (encryption) never
# see one multi-GiB buffer; same size as the torch.save writer's chunks.
_CHUNK = 16 << 20
_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


def write_safetensors(
    snapshot: Snapshot,
    fileobj: IO[bytes],
    names: list[str],
    metadata: dict[str, str] | None = None,
    *,
    crc: bool = False,
) -> None:
    """Write the staged tensors ``names`` of ``snapshot`` as safetensors (writer thread).

    Everything is validated and the header built before the first byte is
    written.  Peak extra memory is one packed copy of the largest
    non-contiguous tensor.

    Args:
        snapshot: a staged snapshot whose ``finish_staging`` has returned,
            with every name in ``names`` in its ``tensor_index``.
        fileobj: binary file object open for writing.
        names: the tensors to write (their order does not matter).
        metadata: string metadata for the ``__metadata__`` object; ``None``
            writes none, ``{}`` an empty one (as safetensors does).
        crc: add ``"crc_num"``: MindSpore's CRC-32 over the names and bytes.

    Raises:
        KeyError: a name is not indexed in ``snapshot``.
        TypeError / ValueError: see :func:`check_safetensors_dtypes` and
            :func:`check_safetensors_metadata`; also for duplicate names and a
            header over :data:`MAX_HEADER_BYTES`.

    Example:
        >>> import io, pickle, torch
        >>> from torchaux.checkpoint.engine import staging
        >>> state = {"w": torch.ones(2, 2), "step": torch.tensor(3)}
        >>> snap = staging.stage(state, pool=staging.HostBufferPool(), pickle_module=pickle,
        ...                      pickle_protocol=2, index=state)
        >>> snap.finish_staging()
        >>> buf = io.BytesIO()
        >>> write_safetensors(snap, buf, ["w", "step"], {"format": "pt"}, crc=True)
        >>> tensors, meta = read_safetensors(buf.getvalue())
        >>> tensors["step"].item(), verify_crc(tensors, meta)
        (3, True)
    """
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a list of str, got {names!r:.200}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"names must be unique; repeated: {dupes}")
    check_safetensors_metadata(metadata, crc=crc)
    missing = [n for n in names if n not in snapshot.tensor_index]
    if missing:
        raise KeyError(
            f"tensors not indexed in the snapshot (pass them in stage(index=...)): {missing}"
        )
    tensors = {name: snapshot.staged_tensor(name) for name in names}
    check_safetensors_dtypes(tensors)
    if crc:
        metadata = {**(metadata or {}), CRC_METADATA_KEY: str(safetensors_crc(tensors))}
    order = sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n))
    header = _header(tensors, order, metadata)
    fileobj.write(struct.pack("<Q", len(header)))
    fileobj.write(header)
    # A direct-I/O file takes the staged bytes as they are (they stay alive and
    # unchanged until the file is finished): written in place where aligned,
    # else copied without holding the GIL (storage/direct_io.py).
    retained = getattr(fileobj, "write_retained", None)
    for name in order:
        view, address = _bytes_at(tensors[name])
        if retained is not None and view:
            retained(view, address)
            continue
        for i in range(0, len(view), _CHUNK):
            fileobj.write(view[i : i + _CHUNK])


def check_safetensors_dtypes(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise unless safetensors can hold every tensor exactly (call before any I/O).

    Checks names (``str``, valid Unicode, not ``"__metadata__"``), types,
    layout (dense), dtype (one of :data:`SAFETENSORS_DTYPES`), shape (F4 needs
    a dimension) and the conjugate/negative view bits, which safetensors
    cannot record.

    Raises:
        TypeError: a name is not a ``str`` or a value not a tensor.
        ValueError: anything else, with the fix in the message.

    Example:
        >>> import torch
        >>> check_safetensors_dtypes({"w": torch.zeros(2)})
        >>> check_safetensors_dtypes({"z": torch.zeros(2, dtype=torch.complex128)})
        Traceback (most recent call last):
        ...
        ValueError: safetensors cannot store tensor 'z' of dtype torch.complex128; ...
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"expected a mapping of str to torch.Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"safetensors tensor names must be str, got {type(name).__name__}")
        _check_unicode(name, "tensor name")
        if name == METADATA_KEY:
            raise ValueError(
                f"a tensor cannot be named {METADATA_KEY!r}: safetensors reserves that key "
                "for the metadata; rename the tensor"
            )
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r}: expected torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(
                f"{name!r} is a {t.layout} tensor; safetensors stores dense tensors only "
                "(.to_dense() works but may make the file much larger)"
            )
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"safetensors cannot store tensor {name!r} of dtype {t.dtype}; supported: "
                f"{', '.join(str(d) for d in SAFETENSORS_DTYPES)} "
                "(convert it, or use format='torch')"
            )
        if t.dtype == torch.float4_e2m1fn_x2 and t.dim() == 0:
            raise ValueError(
                f"{name!r}: a 0-d float4_e2m1fn_x2 tensor holds two F4 values, which "
                "safetensors cannot shape; give it a dimension (t.reshape(1))"
            )
        if t.is_conj() or t.is_neg():
            raise ValueError(
                f"{name!r} is a lazy conjugate/negative view, which safetensors cannot "
                "record; save t.resolve_conj().resolve_neg() instead"
            )
        if t.element_size() > 1 and sys.byteorder != "little":
            raise ValueError("writing safetensors needs a little-endian host")


def check_safetensors_metadata(metadata: Mapping[str, str] | None, *, crc: bool = False) -> None:
    """Raise unless ``metadata`` is valid safetensors metadata (call before any I/O).

    Keys and values must be ``str`` (valid Unicode); with ``crc=True`` the
    key ``"crc_num"`` is reserved for the checksum.

    Example:
        >>> check_safetensors_metadata({"format": "pt"})
        >>> check_safetensors_metadata({"epoch": 3})
        Traceback (most recent call last):
        ...
        TypeError: safetensors metadata values must be str; 'epoch' is int (use str(value))
    """
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"safetensors metadata keys must be str, got {type(key).__name__}")
        if not isinstance(value, str):
            raise TypeError(
                f"safetensors metadata values must be str; {key!r} is {type(value).__name__} "
                "(use str(value))"
            )
        _check_unicode(key, "metadata key")
        _check_unicode(value, "metadata value")
    if crc and CRC_METADATA_KEY in metadata:
        raise ValueError(
            f"metadata key {CRC_METADATA_KEY!r} is reserved for the checksum when crc=True; "
            "rename it or pass crc=False"
        )


def sniff_safetensors(prefix: bytes) -> bool:
    """Whether ``prefix`` (the first 9+ bytes of a file) looks like safetensors.

    True when an 8-byte little-endian header length between 2 and
    :data:`MAX_HEADER_BYTES` is followed by ``{``.  Cheap and never raises;
    torch.save zips (``PK``) and legacy pickles fail it.

    Example:
        >>> sniff_safetensors(b"\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}      ")
        True
        >>> sniff_safetensors(b"PK\\x03\\x04\\x00\\x00\\x08\\x00\\x00")
        False
    """
    if len(prefix) < 9:
        return False
    (n,) = struct.unpack_from("<Q", prefix)
    return 2 <= n <= MAX_HEADER_BYTES and prefix[8:9] == b"{"


def safetensors_crc(tensors: Mapping[str, torch.Tensor]) -> int:
    """MindSpore's safetensors CRC-32 of ``tensors`` (spec §4.2).

    zlib CRC-32 chained, in sorted-name order, over each name's UTF-8 bytes
    and then the tensor's C-order bytes.

    Example:
        >>> import torch, zlib
        >>> t = torch.tensor([1], dtype=torch.uint8)
        >>> safetensors_crc({"a": t}) == zlib.crc32(b"a\\x01")
        True
    """
    crc = 0
    for name in sorted(tensors):
        crc = crc32(name.encode("utf-8"), crc)
        crc = crc32(raw_bytes(tensors[name]), crc)
    return crc


def verify_crc(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool | None:
    """Check ``tensors`` against the ``crc_num`` metadata written with ``crc=True``.

    Pass every tensor of the file (read without ``names_filter``): the CRC
    covers all of them.

    Returns:
        None if ``metadata`` has no ``crc_num``, else whether it matches.

    Raises:
        IntegrityError: ``crc_num`` is not a decimal CRC-32 value.

    Example:
        >>> import torch
        >>> t = {"a": torch.zeros(2)}
        >>> verify_crc(t, {"crc_num": str(safetensors_crc(t))}), verify_crc(t, {})
        (True, None)
    """
    value = metadata.get(CRC_METADATA_KEY)
    if value is None:
        return None
    if not (value.isascii() and value.isdecimal()) or int(value) > 0xFFFFFFFF:
        raise IntegrityError(
            f"metadata {CRC_METADATA_KEY!r} must be a decimal CRC-32 (0..4294967295), "
            f"found {value!r}"
        )
    return safetensors_crc(tensors) == int(value)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The C-order bytes of a CPU tensor as a read-only view.

    Zero-copy for a contiguous tensor; other layouts are first packed into a
    contiguous copy (through a byte view, so every dtype works).  The view
    keeps its tensor alive.

    Example:
        >>> import torch
        >>> bytes(raw_bytes(torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8).t()))
        b'\\x01\\x03\\x02\\x04'
    """
    return _bytes_at(tensor)[0]


def _bytes_at(tensor: torch.Tensor) -> tuple[memoryview, int]:
    # raw_bytes and the address of its first byte.
    if tensor.device.type != "cpu":
        raise ValueError(f"raw_bytes needs a CPU tensor, got device {tensor.device}")
    if not tensor.is_contiguous():
        k = tensor.element_size()
        as_bytes = torch.empty(0, dtype=torch.uint8).set_(
            tensor.untyped_storage(),
            tensor.storage_offset() * k,
            (*tensor.shape, k),
            (*(s * k for s in tensor.stride()), 1),
        )
        tensor = as_bytes.contiguous()
    n = tensor.numel() * tensor.element_size()
    if n == 0:
        return memoryview(b""), 0
    address = tensor.data_ptr()
    array = (ctypes.c_char * n).from_address(address)
    array._owner = tensor  # type: ignore[attr-defined]  # keeps the memory alive
    return memoryview(array).cast("B").toreadonly(), address


def _check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"safetensors {what} {text!r} is not valid Unicode (lone surrogate)"
        ) from exc


def _header(
    tensors: Mapping[str, torch.Tensor], order: list[str], metadata: Mapping[str, str] | None
) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        header[METADATA_KEY] = {key: metadata[key] for key in sorted(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        shape = list(t.shape)
        if t.dtype == torch.float4_e2m1fn_x2:
            shape[-1] *= 2  # safetensors counts F4 elements, two per byte
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": shape,
            "data_offsets": [offset, offset + n],
        }
        offset += n
    # serde_json's compact output: no spaces, non-ASCII kept, the same escapes.
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(
            f"the safetensors header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte "
            "limit of safetensors readers; split the tensors over several files"
        )
    return raw
