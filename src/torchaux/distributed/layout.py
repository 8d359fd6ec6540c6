"""The on-disk layout of a distributed checkpoint: DCP's, plus torchaux's extras.

A checkpoint directory holds what ``torch.distributed.checkpoint``'s
``FileSystemWriter`` writes (torch 2.13, filesystem.py):

* ``.metadata`` - a pickled ``Metadata``; its ``storage_data`` maps every
  chunk's ``MetadataIndex`` to a ``_StorageInfo(relative_path, offset, length)``;
* per-rank data files; each chunk is one ``torch.save`` stream of one tensor
  (or the ``torch.save`` bytes of a non-tensor value) at ``offset``.

torchaux's differences, all invisible to the stock ``FileSystemReader``:

* data files are named ``__<rank>_<n>_<generation>.distcp``: each save uses a
  fresh generation, so a new checkpoint never rewrites the files the
  committed ``.metadata`` points at;
* ``storage_data[EXTRAS_KEY]`` (a string key, never looked up by DCP, which
  looks chunks up by ``MetadataIndex``) holds a dict of builtins: torchaux
  version, checksum algorithm, per-file ``{offset: checksum}``, the encryption
  mode, and the generation;
* an encrypted chunk is one crypto envelope around the ``torch.save`` bytes;
  its ``transform_descriptors`` name ``ENCRYPTION_DESCRIPTOR``, so the stock
  reader stops with "Unknown extension" instead of reading ciphertext.
"""

from __future__ import annotations

import torch.distributed

if not torch.distributed.is_available():  # pragma: no cover - depends on the torch build
    raise ImportError(
        "torchaux.distributed needs torch.distributed, which this torch build lacks; "
        "use torchaux.save_async for single-process checkpoints"
    )

__all__ = [
    "METADATA_NAME",
    "DATA_SUFFIX",
    "EXTRAS_KEY",
    "ENCRYPTION_DESCRIPTOR",
    "FORMAT_VERSION",
    "data_file_name",
]

#: DCP's index file (filesystem.py ``_metadata_fn``).
METADATA_NAME = ".metadata"
#: DCP's data-file suffix (filesystem.py ``DEFAULT_SUFFIX``).
DATA_SUFFIX = ".distcp"
#: Key of torchaux's extras inside ``Metadata.storage_data``.
EXTRAS_KEY = "__torchaux__"
#: ``transform_descriptors`` entry of encrypted chunks.
ENCRYPTION_DESCRIPTOR = "torchaux-envelope/1"
#: Version of the extras dict; readers refuse newer ones.
FORMAT_VERSION = 1


def data_file_name(rank: int, index: int, generation: str) -> str:
    """The name of rank ``rank``'s ``index``-th data file in ``generation``.

    >>> data_file_name(3, 0, "a1b2")
    '__3_0_a1b2.distcp'
    """
    return f"__{rank}_{index}_{generation}{DATA_SUFFIX}"
