"""Reading a ``.metadata`` file without unpickling code.

DCP's ``FileSystemReader.read_metadata`` calls ``pickle.load`` on
``.metadata``, which runs whatever the file names.  :func:`read_metadata`
unpickles with an allow-list: DCP's metadata dataclasses, ``torch.Size``,
dtypes and layouts, and plain containers - the types DCP's default planners
and FileSystemWriter put there (torch 2.13, metadata.py, filesystem.py).
Anything else raises :class:`~torchaux.errors.UnsupportedFormatError`.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from torchaux.distributed.layout import METADATA_NAME
from torchaux.distributed.metadata.check import check_metadata
from torchaux.errors import IntegrityError, UnsupportedFormatError

__all__ = ["read_metadata", "parse_metadata", "metadata_path"]

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch": {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last",
              "preserve_format"},
    # weights_only's own allow-list includes it: it maps a layout's name to the layout.
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice", "complex"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsupportedFormatError(
            f".metadata references {module}.{name}, which is not one of DCP's metadata "
            "types; torchaux does not unpickle arbitrary objects (it could run code). "
            "Load it with torch.distributed.checkpoint's own reader if you trust the file"
        )


def metadata_path(checkpoint_dir: str | os.PathLike[str]) -> str:
    """The path of the checkpoint's index file.

    >>> metadata_path("/ckpt/step_7")
    '/ckpt/step_7/.metadata'
    """
    return os.path.join(os.fspath(checkpoint_dir), METADATA_NAME)


def read_metadata(checkpoint_dir: str | os.PathLike[str]) -> Metadata:
    """Unpickle ``checkpoint_dir/.metadata`` with the allow-list.

    Raises:
        FileNotFoundError: no committed checkpoint in the directory.
        IntegrityError: the file is truncated or not a DCP metadata pickle.
        UnsupportedFormatError: it names types outside the allow-list.
    """
    path = metadata_path(checkpoint_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} does not exist: {os.fspath(checkpoint_dir)!r} holds no committed "
            "distributed checkpoint (a save that never committed leaves none); pass the "
            "directory given to save"
        ) from None
    return parse_metadata(raw, path, _local_sizes(os.fspath(checkpoint_dir)))


def parse_metadata(
    raw: bytes, where: str, file_size: Callable[[str], int | None] | None = None
) -> Metadata:
    """Unpickle ``.metadata`` bytes with the allow-list and check them (:mod:`.check`).

    ``where`` names the file in messages; ``file_size`` gives each data
    file's size by its relative path (stored ranges must lie inside it).

    Raises:
        IntegrityError: truncated, not a DCP metadata pickle, or malformed.
        UnsupportedFormatError: it names types outside the allow-list.
    """
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except UnsupportedFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            KeyError, OverflowError, MemoryError) as exc:
        # KeyError: an allow-listed constructor (torch.serialization._get_layout)
        # given an unknown name; OverflowError/MemoryError: length fields that
        # claim more bytes than exist (tests/distributed/test_metadata_fuzz.py).
        raise IntegrityError(f"{where} is damaged or not a DCP metadata file: {exc!r}") from exc
    if not isinstance(metadata, Metadata):
        raise IntegrityError(
            f"{where} holds a {type(metadata).__name__}, expected a DCP Metadata object"
        )
    check_metadata(metadata, where, file_size)
    return metadata


def _local_sizes(checkpoint_dir: str) -> Callable[[str], int | None]:
    """The size of each data file named in the metadata (None: missing or outside the directory)."""
    root = os.path.realpath(checkpoint_dir)
    cache: dict[str, int | None] = {}

    def size(relative: str) -> int | None:
        if relative not in cache:
            full = os.path.realpath(os.path.join(root, relative))
            try:
                # The reader refuses paths outside the directory with its own message.
                inside = os.path.commonpath([root, full]) == root
                cache[relative] = os.stat(full).st_size if inside else None
            except (OSError, ValueError):
                cache[relative] = None  # missing: the reader names it when a rank needs it
        return cache[relative]

    return size
