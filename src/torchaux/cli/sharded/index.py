"""What a distributed checkpoint directory holds, read from its ``.metadata`` alone.

:func:`read_index` needs no process group and no GPU: it unpickles
``.metadata`` with torchaux's allow-list
(:func:`torchaux.distributed.metadata.read_metadata`, never arbitrary code)
and joins DCP's two tables - ``state_dict_metadata`` (every tensor's global
shape, dtype and shard boxes; the non-tensor values) and ``storage_data``
(where each shard's bytes are: file, offset, length) - with torchaux's extras
(checksum algorithm and per-chunk checksums, encryption mode, generation;
:mod:`torchaux.distributed.layout`).  Stock DCP directories have no extras:
no checksums, files named ``__<rank>_<n>.distcp``.

Only ``stat`` touches the data files here; reading them is
:mod:`torchaux.cli.sharded.check`'s job.

>>> import torch, torchaux.distributed as td
>>> d = os.path.join(doctest_tmp, "ix")
>>> _ = td.save({"w": torch.zeros(4, 2), "step": 3}, d)
>>> ix = read_index(d)
>>> [(c.fqn, c.kind, c.sizes) for c in ix.chunks], ix.checksum
([('step', 'value', None), ('w', 'tensor', [4, 2])], 'xxh3-64')
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from torchaux.checkpoint.storage.publish import STAGING_PREFIX
from torchaux.distributed.layout import (
    DATA_SUFFIX,
    ENCRYPTION_DESCRIPTOR,
    EXTRAS_KEY,
    FORMAT_VERSION,
)
from torchaux.distributed.metadata import read_metadata
from torchaux.errors import IntegrityError, UnsupportedFormatError

__all__ = [
    "Chunk", "DataFile", "Index", "read_index", "is_distributed_dir", "dtype_name", "tensor_bytes",
]

# torchaux's names (layout.data_file_name) and stock DCP's (filesystem.py
# _generate_uuid-free "__{rank}_{n}.distcp") both start with the rank.
_RANK_IN_NAME = re.compile(r"^__(\d+)_")


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"``.

    >>> import torch; dtype_name(torch.bfloat16)
    'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


@dataclass
class Chunk:
    """One stored chunk: a tensor shard (``offsets``/``sizes`` in the global tensor) or a value."""

    fqn: str
    kind: str  # "tensor" or "value"
    offsets: list[int] | None
    sizes: list[int] | None
    file: str
    offset: int
    length: int
    encrypted: bool
    transforms: list[str]
    checksum: int | None

    @property
    def where(self) -> str:
        """``'w' [0:4, 0:2]`` - the tensor and its box, for messages."""
        if self.offsets is None or self.sizes is None:
            return repr(self.fqn)
        box = ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes))
        return f"{self.fqn!r} [{box}]"


@dataclass
class DataFile:
    """A data file the metadata references: its rank, expected and actual size, chunks."""

    name: str
    rank: int | None
    expected_size: int  # the end of its last chunk
    size: int | None  # None: missing (or not a regular file)
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Index:
    """A distributed checkpoint directory as its metadata describes it."""

    path: str
    metadata: Metadata
    extras: dict[str, Any] | None
    chunks: list[Chunk]
    files: dict[str, DataFile]
    unreferenced: list[str]  # .distcp files no chunk points at
    staging: list[str]  # folders of saves that never committed

    @property
    def writer(self) -> str:
        """``"torchaux"`` (extras present) or ``"dcp"`` (a stock FileSystemWriter directory)."""
        return "torchaux" if self.extras is not None else "dcp"

    @property
    def checksum(self) -> str | None:
        """The checksum algorithm of the chunks, or None (stock DCP records none)."""
        return None if self.extras is None else str(self.extras.get("checksum"))

    @property
    def encryption(self) -> str | None:
        """The cipher of every chunk (``"AES-GCM"``, ...), or None."""
        if self.extras is not None and self.extras.get("encryption"):
            return str(self.extras["encryption"])
        return "unknown" if any(c.encrypted for c in self.chunks) else None

    @property
    def ranks(self) -> list[int]:
        """The ranks that wrote a data file."""
        return sorted({f.rank for f in self.files.values() if f.rank is not None})

    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Global tensor metadata by name."""
        return {k: v for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}

    def values(self) -> list[str]:
        """Names of the non-tensor values."""
        return [k for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, BytesStorageMetadata)]


def is_distributed_dir(path: str) -> bool:
    """Whether ``path`` is a directory (the CLI's dispatch: a file is a single checkpoint).

    >>> is_distributed_dir(doctest_tmp), is_distributed_dir(os.path.join(doctest_tmp, "nope"))
    (True, False)
    """
    return os.path.isdir(path)


def _check_name(name: object, path: str) -> str:
    # A crafted .metadata could point outside the directory ("../../etc/shadow");
    # DCP's writers only ever put plain names here (filesystem.py).
    if (not isinstance(name, str) or not name or os.path.basename(name) != name
            or name in (".", "..") or "\x00" in name):
        raise IntegrityError(
            f"{path}/.metadata names data file {name!r}, which is not a plain file name in the "
            "checkpoint directory; the metadata is damaged or crafted"
        )
    return name


def _extras(metadata: Metadata, path: str) -> dict[str, Any] | None:
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise IntegrityError(f"{path}/.metadata has no chunk table (storage_data)")
    extras = storage.get(EXTRAS_KEY)
    if extras is None:
        return None
    if not isinstance(extras, dict) or not isinstance(extras.get("files"), dict):
        raise IntegrityError(f"{path}/.metadata: torchaux's extras are damaged ({type(extras).__name__})")
    if int(extras.get("format_version", 0)) > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{path} was written by a newer torchaux (extras format "
            f"{extras.get('format_version')}, this one reads {FORMAT_VERSION}); upgrade torchaux"
        )
    return extras


def _chunk(key: MetadataIndex, info: Any, md: Any, extras: dict[str, Any] | None, path: str) -> Chunk:
    name = _check_name(getattr(info, "relative_path", None), path)
    offset, length = int(info.offset), int(info.length)
    if offset < 0 or length < 0:
        raise IntegrityError(f"{path}/.metadata: chunk of {key.fqn!r} has offset {offset}, length {length}")
    transforms = [str(t) for t in (getattr(info, "transform_descriptors", None) or ())]
    checksum = None
    if extras is not None:
        entry = extras["files"].get(name)
        if isinstance(entry, dict):
            checksum = entry.get("checksums", {}).get(offset)
    if isinstance(md, TensorStorageMetadata):
        offsets = [int(x) for x in (key.offset or ())]
        sizes = next((list(map(int, c.sizes)) for c in md.chunks
                      if list(map(int, c.offsets)) == offsets), None)
        kind = "tensor"
    else:
        offsets = sizes = None
        kind = "value"
    return Chunk(key.fqn, kind, offsets if kind == "tensor" else None, sizes, name, offset, length,
                 ENCRYPTION_DESCRIPTOR in transforms, transforms, checksum)


def _stat_size(path: str) -> int | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _file_rank(name: str, extras: dict[str, Any] | None) -> int | None:
    entry = (extras or {}).get("files", {}).get(name)
    if isinstance(entry, dict) and isinstance(entry.get("rank"), int):
        return int(entry["rank"])
    m = _RANK_IN_NAME.match(name)
    return int(m.group(1)) if m else None


def read_index(path: str) -> Index:
    """Read ``path/.metadata`` and stat the data files it references.

    Raises:
        FileNotFoundError: no ``.metadata``: nothing was ever committed there.
        IntegrityError: the metadata is damaged or names files outside the directory.
        UnsupportedFormatError: written by a newer torchaux, or names unknown types.
    """
    path = os.path.abspath(path)
    metadata = read_metadata(path)
    extras = _extras(metadata, path)
    chunks = []
    for key, info in metadata.storage_data.items():
        if key == EXTRAS_KEY:
            continue
        if not isinstance(key, MetadataIndex):
            raise IntegrityError(f"{path}/.metadata: unexpected chunk key {key!r}")
        chunks.append(_chunk(key, info, metadata.state_dict_metadata.get(key.fqn), extras, path))
    chunks.sort(key=lambda c: (c.fqn, c.offsets or []))
    files: dict[str, DataFile] = {}
    for c in sorted(chunks, key=lambda c: (c.file, c.offset)):
        entry = files.get(c.file)
        if entry is None:
            size = _stat_size(os.path.join(path, c.file))
            entry = files[c.file] = DataFile(c.file, _file_rank(c.file, extras), 0, size)
        entry.chunks.append(c)
        entry.expected_size = max(entry.expected_size, c.offset + c.length)
    names = sorted(os.listdir(path))
    unreferenced = [n for n in names if n.endswith(DATA_SUFFIX) and n not in files]
    staging = [n for n in names if n.startswith(STAGING_PREFIX)
               and os.path.isdir(os.path.join(path, n))]
    files = dict(sorted(files.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank, kv[0])))
    return Index(path, metadata, extras, chunks, files, unreferenced, staging)


def tensor_bytes(md: TensorStorageMetadata) -> int:
    """Bytes of the full (global) tensor.

    >>> import torch
    >>> from torch.distributed.checkpoint.metadata import TensorProperties
    >>> tensor_bytes(TensorStorageMetadata(TensorProperties(torch.float16), torch.Size([3, 4]), []))
    24
    """
    import torch

    return math.prod(md.size) * torch.empty((), dtype=md.properties.dtype).element_size()
