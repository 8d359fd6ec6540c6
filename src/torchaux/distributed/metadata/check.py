"""Checking an unpickled ``.metadata`` before any planner or reader uses it.

The allow-listed unpickler (:mod:`.metadata`) guarantees that only DCP's
metadata types come out of the file, not that they are well formed: a pickle
may build a ``_StorageInfo`` without ``length``, a chunk table with no entry
for a chunk, or a tensor that claims 10^12 elements (DCP's
``_EmptyStateDictLoadPlanner`` would ``torch.empty`` it before reading a
byte).  :func:`check_metadata` validates the structure DCP's planners and
:class:`~torchaux.distributed.StorageReader` rely on (torch 2.13:
``metadata.py``, ``filesystem.py``, ``default_planner.py``) and raises
:class:`~torchaux.errors.IntegrityError` naming the key, so a damaged file
fails before any allocation or read.

Bounding allocations: every chunk must lie inside its tensor, the chunks must
add up to the tensor's element count, and each chunk's stored bytes must be
at least its raw size.  With ``file_size`` (the reader's view of each data
file's size), every stored range must also lie inside its file, so the memory
a load allocates is bounded by the bytes actually on disk.

>>> from torch.distributed.checkpoint.metadata import Metadata
>>> check_metadata(Metadata(state_dict_metadata={}, storage_data={}), "ck/.metadata")
>>> check_metadata(Metadata(state_dict_metadata={"w": 3}, storage_data={}), "ck/.metadata")
Traceback (most recent call last):
...
torchaux.errors.IntegrityError: ck/.metadata: entry 'w' is of type int, expected TensorStorageMetadata or BytesStorageMetadata; the file is damaged
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from torchaux.distributed.layout import EXTRAS_KEY
from torchaux.errors import IntegrityError

__all__ = ["check_metadata"]

_MISSING = object()


def _fail(where: str, what: str) -> IntegrityError:
    return IntegrityError(f"{where}: {what}; the file is damaged")


def _size(value: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, (torch.Size, tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _fail(where, f"{what} is {value!r}, expected a sequence of non-negative ints")
    return tuple(value)


def _attr(obj: Any, name: str, where: str, what: str) -> Any:
    value = getattr(obj, name, _MISSING)
    if value is _MISSING:
        raise _fail(where, f"{what} has no field {name!r}")
    return value


def _check_tensor(fqn: str, entry: TensorStorageMetadata, where: str) -> list[tuple[tuple[int, ...], int]]:
    """The tensor's chunks as (offsets, raw bytes), after checking their bounds."""
    props = _attr(entry, "properties", where, f"tensor {fqn!r}")
    if not isinstance(props, TensorProperties):
        raise _fail(where, f"tensor {fqn!r} has properties of type {type(props).__name__}")
    dtype = _attr(props, "dtype", where, f"tensor {fqn!r}'s properties")
    if not isinstance(dtype, torch.dtype):
        raise _fail(where, f"tensor {fqn!r} has dtype {dtype!r}, expected a torch.dtype")
    size = _size(_attr(entry, "size", where, f"tensor {fqn!r}"), where, f"tensor {fqn!r}'s size")
    chunks = _attr(entry, "chunks", where, f"tensor {fqn!r}")
    if not isinstance(chunks, list):
        raise _fail(where, f"tensor {fqn!r} has chunks of type {type(chunks).__name__}, expected a list")
    itemsize = torch.empty((), dtype=dtype).element_size()
    total, out = 0, []
    for i, chunk in enumerate(chunks):
        what = f"chunk {i} of {fqn!r}"
        if not isinstance(chunk, ChunkStorageMetadata):
            raise _fail(where, f"{what} is a {type(chunk).__name__}")
        offsets = _size(_attr(chunk, "offsets", where, what), where, f"{what}'s offsets")
        sizes = _size(_attr(chunk, "sizes", where, what), where, f"{what}'s sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
            o + s > d for o, s, d in zip(offsets, sizes, size)
        ):
            raise _fail(where, f"{what} (offsets {offsets}, sizes {sizes}) lies outside the tensor's size {size}")
        numel = math.prod(sizes)
        total += numel
        out.append((offsets, numel * itemsize))
    if total > math.prod(size):
        raise _fail(where, f"the chunks of {fqn!r} hold {total} elements, more than its size {size} has")
    return out


def _check_storage(
    key: MetadataIndex, info: Any, where: str, file_size: Callable[[str], int | None] | None
) -> _StorageInfo:
    what = f"the storage entry of {key.fqn!r}"
    if not isinstance(info, _StorageInfo):
        raise _fail(where, f"{what} is a {type(info).__name__}, expected a _StorageInfo")
    path = _attr(info, "relative_path", where, what)
    offset = _attr(info, "offset", where, what)
    length = _attr(info, "length", where, what)
    if not isinstance(path, str) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)
    ):
        raise _fail(where, f"{what} is ({path!r}, {offset!r}, {length!r}), expected (str, int >= 0, int >= 0)")
    descriptors = getattr(info, "transform_descriptors", None)
    if descriptors is not None and (
        not isinstance(descriptors, (list, tuple)) or not all(isinstance(d, str) for d in descriptors)
    ):
        raise _fail(where, f"{what} has transform descriptors {descriptors!r}, expected strings")
    if file_size is not None:
        size = file_size(path)
        if size is not None and offset + length > size:
            # The data file, not the metadata, is what is damaged here.
            raise IntegrityError(
                f"{path!r} is truncated: it holds {size} bytes, but {where} places "
                f"{key.fqn!r} at bytes {offset}..{offset + length}; the file is incomplete or "
                "damaged: restore it from a copy or load an older checkpoint"
            )
    return info


def _check_extras(extras: Any, where: str) -> None:
    if not isinstance(extras, dict):
        raise _fail(where, f"the torchaux entry is a {type(extras).__name__}, expected a dict")
    version = extras.get("format_version", 0)
    files = extras.get("files", {})
    if not isinstance(version, int) or not isinstance(files, dict) or not isinstance(
        extras.get("checksum", ""), str
    ) or not isinstance(extras.get("encryption"), (str, type(None))):
        raise _fail(where, "the torchaux entry's format_version/files/checksum/encryption have the wrong types")
    for name, entry in files.items():
        sums = entry.get("checksums") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(sums, dict) or not all(
            isinstance(k, int) and isinstance(v, int) for k, v in sums.items()
        ):
            raise _fail(where, f"the checksum table of {name!r} is malformed")


def check_metadata(
    metadata: Metadata, where: str, file_size: Callable[[str], int | None] | None = None
) -> None:
    """Raise :class:`~torchaux.errors.IntegrityError` unless ``metadata`` is well formed.

    Args:
        metadata: what the allow-listed unpickler returned.
        where: the file's name, for messages.
        file_size: the size of a data file by its relative path (None when it
            cannot be told); stored ranges must lie inside it.
    """
    entries = _attr(metadata, "state_dict_metadata", where, "the metadata")
    storage = _attr(metadata, "storage_data", where, "the metadata")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise _fail(where, "state_dict_metadata and storage_data must be dicts")
    planner_data = getattr(metadata, "planner_data", None)
    if planner_data is not None and not isinstance(planner_data, dict):
        raise _fail(where, f"planner_data is a {type(planner_data).__name__}, expected a dict")
    for key in storage:
        if key != EXTRAS_KEY and not isinstance(key, MetadataIndex):
            raise _fail(where, f"the chunk table has a key {key!r}, expected a MetadataIndex")
    if EXTRAS_KEY in storage:
        _check_extras(storage[EXTRAS_KEY], where)
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise _fail(where, f"state_dict_metadata has a key {fqn!r}, expected a str")
        if isinstance(entry, BytesStorageMetadata):
            chunks = [(None, 0)]
        elif isinstance(entry, TensorStorageMetadata):
            chunks = _check_tensor(fqn, entry, where)
        else:
            raise _fail(where, f"entry {fqn!r} is of type {type(entry).__name__}, expected "
                               "TensorStorageMetadata or BytesStorageMetadata")
        if planner_data is not None and fqn in planner_data:
            path = planner_data[fqn]
            # DCP flattens a nested key path by joining it with dots
            # (torch/distributed/checkpoint/_nested_dict.py); any other path
            # rebuilds a key that the metadata does not have.
            if not isinstance(path, (tuple, list)) or ".".join(map(str, path)) != fqn:
                raise _fail(where, f"planner_data of {fqn!r} is {path!r}, not the key path of {fqn!r}")
        for offsets, raw_bytes in chunks:
            key = MetadataIndex(fqn, offsets)
            if key not in storage:
                raise _fail(where, f"{fqn!r} (chunk at {offsets}) has no entry in the chunk table")
            info = _check_storage(key, storage[key], where, file_size)
            if info.length < raw_bytes:
                raise _fail(where, f"{fqn!r} (chunk at {offsets}) is stored in {info.length} bytes, "
                                   f"less than its {raw_bytes} raw bytes")
