"""Writer of the ``torch.save`` zip format from a staged :class:`Snapshot`.

The records and their order are those of torch/serialization.py ``_save``
(torch 2.13): ``data.pkl``, ``.format_version`` (``"1"``: storages numbered by
first appearance), ``.storage_alignment``, ``byteorder`` (unless disabled),
then ``data/<key>`` for every storage.  torch's own zip writer adds
``version`` and ``.data/serialization_id``.  Output therefore loads with plain
``torch.load`` (``weights_only=True`` where the object allows it) and is
byte-identical to ``torch.save``'s apart from the random serialization id.
"""

from __future__ import annotations

import sys
from typing import IO

import torch
from torch.serialization import get_crc32_options

from torchaux.checkpoint.staging import Snapshot

__all__ = ["write_torch_save", "FORMAT_VERSION"]

#: ``.format_version`` that torch.save 2.13 writes (storage keys numbered in order).
FORMAT_VERSION = "1"


def _storage_alignment() -> int:
    # torch >= 2.6 exposes the alignment setting; older releases used 64.
    getter = getattr(torch.serialization, "_get_storage_alignment", None)
    return int(getter()) if getter is not None else 64


def write_torch_save(
    snapshot: Snapshot, fileobj: IO[bytes], *, disable_byteorder_record: bool = False
) -> None:
    """Write ``snapshot`` to ``fileobj`` in torch.save format (writer thread).

    Args:
        snapshot: a staged snapshot whose ``finish_staging`` has returned.
        fileobj: binary file object open for writing.
        disable_byteorder_record: omit the ``byteorder`` record, as torch.save's
            ``_disable_byteorder_record`` does.
    """
    alignment = _storage_alignment()
    writer = torch._C.PyTorchFileWriter(fileobj, get_crc32_options(), alignment)
    writer.write_record("data.pkl", snapshot.pickled, len(snapshot.pickled))
    writer.write_record(".format_version", FORMAT_VERSION, len(FORMAT_VERSION))
    align = str(alignment)
    writer.write_record(".storage_alignment", align, len(align))
    if not disable_byteorder_record:
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for key, storage in snapshot.records():
        writer.write_record(f"data/{key}", storage, storage.nbytes())
    writer.write_end_of_file()
    fileobj.flush()
