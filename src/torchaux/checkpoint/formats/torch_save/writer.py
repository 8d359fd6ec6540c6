"""Writer of the ``torch.save`` format from a staged :class:`Snapshot`.

The records and their order are those of torch/serialization.py ``_save`` and
``PyTorchStreamWriter::writeEndOfFile`` (torch 2.13): ``data.pkl``,
``.format_version`` (``"1"``: storages numbered by first appearance),
``.storage_alignment``, ``byteorder`` (unless disabled), ``data/<key>`` for
every storage, ``version`` and ``.data/serialization_id``.  The output loads
with plain ``torch.load`` (``weights_only=True`` where the object allows it,
``mmap=True`` too) and is byte-identical to ``torch.save``'s apart from the
serialization id (see :mod:`torchaux.checkpoint.formats.torch_save.container`);
a large state written with direct I/O is torch.save's file for storage
alignment 4096 (:func:`_alignment`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import IO

import torch
from torch.serialization import get_crc32_options

from torchaux.checkpoint.formats.torch_save import integrity
from torchaux.checkpoint.formats.torch_save.container import TorchZipWriter, storage_view
from torchaux.checkpoint.engine.staging import Snapshot

# torch.serialization imports this on its first save (it installs a config
# module: 1-3 ms here); importing it with torchaux keeps that off a
# training run's first save_async call.  torch < 2.6 has no such module.
with contextlib.suppress(ImportError):
    import torch.utils.serialization.config  # noqa: F401

__all__ = [
    "write_torch_save", "archive_name_for", "capture_options", "TorchSaveOptions",
    "FORMAT_VERSION", "FILE_FORMAT_VERSION",
]

#: ``.format_version`` that torch.save 2.13 writes (storage keys numbered in order).
FORMAT_VERSION = "1"
#: ``version`` record of torch 2.13 (caffe2/serialize/versions.h, kMinProducedFileFormatVersion).
FILE_FORMAT_VERSION = "3\n"


@dataclass(frozen=True)
class TorchSaveOptions:
    """The settings ``torch.save`` reads when it writes, fixed at the call.

    In torch 2.13 ``torch.serialization.set_crc32_options`` and
    ``torch.utils.serialization.config.save.*`` are per thread, so a
    background writer must not read them itself: :func:`capture_options`
    takes them on the calling thread.  ``skip_data`` (thread-local too) is
    captured by staging, which copies nothing under it; the
    ``use_pinned_memory_for_d2h`` setting only changes how torch.save copies
    device memory, never the bytes, and staging always pins.
    """

    compute_crc32: bool = True
    storage_alignment: int = 64


def capture_options() -> TorchSaveOptions:
    """The calling thread's torch.save settings (see :class:`TorchSaveOptions`).

    >>> from torch.utils.serialization import config
    >>> capture_options()
    TorchSaveOptions(compute_crc32=True, storage_alignment=64)
    >>> config.save.storage_alignment = 4096  # this thread only
    >>> capture_options().storage_alignment
    4096
    >>> config.save.storage_alignment = 64
    """
    # torch >= 2.6 exposes the alignment setting; older releases used 64.
    getter = getattr(torch.serialization, "_get_storage_alignment", None)
    alignment = int(getter()) if getter is not None else 64
    return TorchSaveOptions(bool(get_crc32_options()), alignment)


def archive_name_for(path: str | None) -> str:
    """Top-level folder name torch.save uses inside the zip for ``path``.

    torch takes the file name without directories and without its last
    extension; file objects, and non-ASCII names (which torch.save writes
    through a Python file object), get ``"archive"``.

    >>> archive_name_for("/ckpt/model.step10.pt"), archive_name_for(None)
    ('model.step10', 'archive')
    >>> archive_name_for("/ckpt/mödel.pt")
    'archive'
    """
    if path is None or not path.isascii():
        return "archive"
    name = os.path.basename(path)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return stem or "archive"


# Records are aligned for in-place writes only when the padding costs at most
# 1/_PADDING_SHARE of the data (10^5 tiny tensors would otherwise gain 400 MB).
_PADDING_SHARE = 100


def _alignment(snapshot: Snapshot, fileobj: IO[bytes], configured: int) -> int:
    """The storage alignment of this file: torch's setting, or the file's in-place alignment.

    A direct-I/O file (``RETAINED_ALIGNMENT`` = 4096) writes a page-aligned
    staging buffer straight to the disk when the record starts at a 4096-byte
    offset; at torch's default 64 it must first copy it into an aligned buffer
    (0.08 s of the writer's CPU per GiB here, docs/benchmarks.md §8).  The file
    is then exactly what ``torch.save`` writes with
    ``torch.utils.serialization.config.save.storage_alignment = 4096``: the
    ``.storage_alignment`` record says 4096 and torch.load (also with
    ``config.load.calculate_storage_offsets``) reads it.
    """
    in_place = getattr(fileobj, "RETAINED_ALIGNMENT", None)
    if in_place is None or configured != 64 or snapshot.skip_data:
        return configured
    sizes = [n for _, n in snapshot.sizes()]
    if sizes and sum(sizes) >= _PADDING_SHARE * in_place * len(sizes):
        return int(in_place)
    return configured


def write_torch_save(
    snapshot: Snapshot,
    fileobj: IO[bytes],
    *,
    archive_name: str = "archive",
    disable_byteorder_record: bool = False,
    content_crc: bool = False,
    options: TorchSaveOptions | None = None,
) -> None:
    """Write ``snapshot`` to ``fileobj`` in torch.save format (writer thread).

    Args:
        snapshot: a staged snapshot whose ``finish_staging`` has returned.
        fileobj: binary file object open for writing, at position 0.
        archive_name: folder inside the zip (see :func:`archive_name_for`).
        disable_byteorder_record: as torch.save's ``_disable_byteorder_record``:
            the ``byteorder`` record moves to the end instead of vanishing.
        content_crc: compute every member CRC (whatever torch's CRC option) and
            append the ``.torchaux/crc32`` member (see :mod:`..integrity`).
        options: torch.save settings captured on the caller's thread
            (:func:`capture_options`); ``None`` reads them on this thread.

    A snapshot staged under ``torch.serialization.skip_data()`` gets its
    storage records written as zeros of the right size with CRC 0, as torch.save.
    """
    opts = options if options is not None else capture_options()
    alignment = _alignment(snapshot, fileobj, opts.storage_alignment)
    in_place = alignment == getattr(fileobj, "RETAINED_ALIGNMENT", None)
    writer = TorchZipWriter(
        fileobj, archive_name=archive_name, alignment=alignment,
        compute_crc=content_crc or opts.compute_crc32,
    )
    writer.write_record("data.pkl", snapshot.pickled)
    writer.write_record(".format_version", FORMAT_VERSION.encode())
    writer.write_record(".storage_alignment", str(alignment).encode())
    if not disable_byteorder_record:
        writer.write_record("byteorder", sys.byteorder.encode())
    if snapshot.skip_data:
        for key, nbytes in snapshot.sizes():
            writer.write_record_skipped(f"data/{key}", nbytes)
    else:
        for (key, storage), crc in zip(snapshot.records(), snapshot.record_crcs()):
            address = storage.data_ptr() if in_place and storage.nbytes() else None
            writer.write_record(f"data/{key}", storage_view(storage), address=address, crc=crc)
    writer.write_record("version", FILE_FORMAT_VERSION.encode())
    if disable_byteorder_record:
        # torch 2.13's zip writer adds the record itself at the end when the
        # caller skipped it, so torch.save never really omits it; mirror that.
        writer.write_record("byteorder", sys.byteorder.encode())
    writer.write_record(".data/serialization_id", writer.serialization_id().encode())
    if content_crc:
        crc = integrity.content_crc(writer.members())
        writer.write_record(integrity.CRC_MEMBER, f"{crc:08x}".encode())
    writer.finish()
