"""Loading a torch.save zip in parallel, straight into the tensors' storages.

``torch.load`` reads storage records one after the other on the calling
thread.  Here the zip directory is checked first
(:func:`~torchaux.checkpoint.formats.torch_save.integrity.check_members`: stored
members only, inside the file, no overlaps), every ``data/<key>`` record gets
an uninitialised storage of its size, and
:func:`~torchaux.checkpoint.formats.fill.fill` reads all records into them on
several threads (from a plain file, or through the decrypting source, which
verifies every chunk), with the CRC-32 of every member computed on the way
when asked.  Then the pickle is run by torch's own weights-only unpickler
(``torch.serialization._load`` with ``torch._weights_only_unpickler``), whose
storage reads are answered from the filled storages: map_location, byte
order and the allowed globals behave exactly as in ``torch.load(...,
weights_only=True)``.  Peak memory is the storages plus the small members.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from torchaux.checkpoint.formats.fill import (
    BufferSource, Source, Target, allocate, checksum, fill, storage_view,
)
from torchaux.checkpoint.formats.torch_save import integrity
from torchaux.errors import IntegrityError

_log = logging.getLogger("torchaux")

__all__ = ["SourceFile", "ZipRecords", "read_zip", "unpickle"]

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_CRC_MEMBER_SIZE = 8
# Longest quote of file content (a member name) in an error message.
_QUOTE = 80


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


class SourceFile(io.RawIOBase):
    """A read-only, seekable file over a fill source (for ``zipfile``'s directory parsing)."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source, self._pos = source, 0

    def readable(self) -> bool:
        """True."""
        return True

    def seekable(self) -> bool:
        """True."""
        return True

    def tell(self) -> int:
        """The current position."""
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move to ``offset`` from the start (0), here (1) or the end (2)."""
        base = (0, self._pos, self._source.size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        """Up to ``len(buffer)`` bytes from the current position."""
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._source.size - self._pos))
        view[:n] = self._source.read(self._pos, n)
        self._pos += n
        return n


class _HeaderFile(SourceFile):
    """The directory through authenticated reads, local headers (30 bytes) through ``peek``."""

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self._peek = getattr(source, "peek", source.read)
        # Bytes in memory (a mapping): local headers are unpacked in place.
        self.in_place: memoryview | None = getattr(source, "view", None)

    def readinto(self, buffer: Any) -> int:
        """As :meth:`SourceFile.readinto`; 30-byte reads (local headers) are peeks."""
        view = memoryview(buffer).cast("B")
        if len(view) != 30:
            return super().readinto(view)
        n = max(0, min(30, self._source.size - self._pos))
        view[:n] = self._peek(self._pos, n)
        self._pos += n
        return n


@dataclass
class ZipRecords:
    """The members of a loaded archive, answering ``torch.serialization._load``'s reader calls.

    ``_load`` calls ``has_record``, ``get_record``, ``get_storage_from_record``
    and ``serialization_id`` of torch's ``PyTorchFileReader``, with names
    below the archive folder (``data.pkl``, ``data/0``); these are the same
    calls, served from memory.
    """

    path: str
    prefix: str
    small: dict[str, bytes]
    storages: dict[str, torch.UntypedStorage]
    offsets: dict[str, int]
    #: True: the content CRC matched; False: the file has none; None: not checked.
    crc_verified: bool | None = None

    def has_record(self, name: str) -> bool:
        """Whether ``<archive>/name`` is a member."""
        return name in self.small or name in self.storages

    def get_all_records(self) -> list[str]:
        """Every member name, below the archive folder."""
        return [*self.small, *self.storages]

    def get_record(self, name: str) -> bytes:
        """A small member's bytes."""
        if name in self.small:
            return self.small[name]
        if name in self.storages:
            return bytes(self.storages[name])
        raise IntegrityError(f"{self.path}: the archive has no member {_quote(self.prefix + name)}")

    def get_storage_from_record(self, name: str, nbytes: int, _cls: object) -> Any:
        """The filled storage of ``name`` (``nbytes`` must match its size)."""
        storage = self.storages.get(name)
        if storage is None:
            raise IntegrityError(
                f"{self.path}: the pickle refers to storage record {_quote(self.prefix + name)}, "
                "which the archive does not hold; the file is damaged or was crafted"
            )
        if storage.nbytes() != nbytes:
            raise IntegrityError(
                f"{self.path}: storage record {_quote(self.prefix + name)} holds "
                f"{storage.nbytes()} bytes, but the pickle expects {nbytes}; the file is damaged"
            )
        return _Typed(storage)

    def get_record_offset(self, name: str) -> int:
        """Offset of ``name``'s data in the (plaintext) file (meta map_location)."""
        return self.offsets[name]

    def get_record_header_offset(self, name: str) -> int:
        """As :meth:`get_record_offset` (only used to size data descriptors)."""
        return self.offsets[name]

    def get_record_offset_no_read(self, _at: int, name: str, _n: int, _align: int) -> int:
        """As :meth:`get_record_offset`: the directory already gave every offset."""
        return self.offsets[name]

    def serialization_id(self) -> str:
        """The archive's ``.data/serialization_id`` (empty if absent)."""
        return self.small.get(".data/serialization_id", b"").decode("ascii", "replace")


class _Typed:
    """What ``PyTorchFileReader.get_storage_from_record`` returns, as far as ``_load`` uses it."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self._untyped_storage = storage

    def _typed_storage(self) -> _Typed:
        return self


def read_zip(
    source: Source, path: str, *, crc_check: bool | None = False, data: bool = True,
    mapped: torch.UntypedStorage | None = None, workers: int | None = None,
) -> ZipRecords:
    """Check the archive's layout and read every member (storage records in parallel).

    Args:
        source: the archive's plaintext.
        path: for messages.
        crc_check: verify every member's CRC-32 (computed while reading) and
            the content CRC member, as
            :func:`~torchaux.checkpoint.formats.torch_save.integrity.verify_zip_crc` does;
            None: only when the archive has a content CRC member.
        data: False reads only the small members (a meta map_location).
        mapped: the whole file memory-mapped (``UntypedStorage.from_file``):
            storage records become slices of it instead of being read.
        workers: reading threads (default: per core).

    Raises:
        IntegrityError: a damaged layout, truncated data, a CRC mismatch.
    """
    if not data and crc_check:
        raise ValueError(
            "crc_check=True needs the tensor bytes, but a meta map_location reads none; "
            "load with crc_check=None or False"
        )
    # A mapped file's directory and local headers are parsed from the mapping
    # (no read syscall per member header).
    headers = source if mapped is None else BufferSource(storage_view(mapped), path)
    try:
        members = integrity.check_members(_HeaderFile(headers), path)
    except IntegrityError:
        if hasattr(source, "peek"):  # a tampered chunk, not a bad layout: say so
            fill(source, [])
        raise
    if crc_check is None and not data:
        crc_check = False
    if crc_check is None:  # check when the file records a content CRC
        crc_check = any(i.filename.endswith("/" + integrity.CRC_MEMBER) for i, _ in members)
    if crc_check:
        _check_ends(source, members, path)
    if not members:
        raise IntegrityError(f"{path}: the archive has no members; it is not a torch.save file")
    first = members[0][0].filename
    prefix = first[: first.find("/") + 1] if "/" in first else ""
    records = ZipRecords(path, prefix, {}, {}, {})
    targets: list[Target] = []
    read_by: list[int] = []  # member index of each target
    views: list[memoryview] = []
    for index, (info, at) in enumerate(members):
        name = info.filename[len(prefix):] if info.filename.startswith(prefix) else info.filename
        records.offsets[name] = at
        size = info.file_size
        if name.startswith("data/"):
            if mapped is not None:
                storage = mapped[at : at + size]
            else:  # uninitialised: every byte is about to be overwritten
                storage = allocate(size if data else 0)
            records.storages[name] = storage
            # A mapped record needs a view only for its CRC.
            wanted = data if mapped is None else bool(crc_check)
            view = storage_view(storage) if wanted else memoryview(b"")
        elif mapped is not None:  # copied out of the mapping: no reading threads to start
            view = memoryview(bytes(storage_view(mapped[at : at + size]))) if size else memoryview(b"")
        else:
            view = memoryview(bytearray(size))
        views.append(view)
        if len(view) and mapped is None:
            targets.append(Target(at, view))
            read_by.append(index)
    crcs = fill(source, targets, crc=crc_check, workers=workers) if targets or mapped is None else []
    for (info, _), view in zip(members, views):
        name = info.filename[len(prefix):] if info.filename.startswith(prefix) else info.filename
        if name not in records.storages:
            records.small[name] = bytes(view)
    if crc_check:
        assert crcs is not None
        values = [0] * len(members)
        for index, value in zip(read_by, crcs):
            values[index] = value
        if mapped is not None:
            read = set(read_by)
            inside = [i for i, v in enumerate(views) if len(v) and i not in read]
            for index, value in zip(inside, checksum([views[i] for i in inside], workers)):
                values[index] = value
        records.crc_verified = _verify_crcs(members, values, records, path)
    return records


def _check_ends(source: Source, members: list[tuple[Any, int]], path: str) -> None:
    """The archive starts at byte 0 and ends with its end record (verify_zip_crc's checks)."""
    tail = source.read(source.size - _EOCD_SIZE, _EOCD_SIZE) if source.size >= _EOCD_SIZE else b""
    if len(tail) < _EOCD_SIZE or tail[:4] != _EOCD or tail[-2:] != b"\0\0":
        raise IntegrityError(
            f"{path}: expected the archive to end with its end-of-directory record, found "
            "extra bytes after it (appended data); the file was modified after saving"
        )
    if members and members[0][0].header_offset != 0:
        raise IntegrityError(
            f"{path}: expected the archive to start at byte 0, found "
            f"{members[0][0].header_offset} bytes before it; the file was modified after saving"
        )


def _verify_crcs(
    members: list[tuple[Any, int]], crcs: list[int], records: ZipRecords, path: str
) -> bool:
    """The member CRCs against the directory, then the content CRC fold (integrity.py's rules)."""
    folded: list[tuple[str, int, int]] = []
    stored: str | None = None
    for (info, _), value in zip(members, crcs):
        is_crc = info.filename.endswith("/" + integrity.CRC_MEMBER)
        if is_crc and info.file_size != _CRC_MEMBER_SIZE:
            raise IntegrityError(
                f"{path}: the content CRC member holds {info.file_size} bytes; expected "
                f"{_CRC_MEMBER_SIZE} hex digits: the file was modified after saving"
            )
        if value != info.CRC:
            bad = _quote(f"Bad CRC-32 for file {info.filename!r}")
            raise IntegrityError(
                f"{path}: member {_quote(info.filename)} fails its CRC-32 check "
                f"(BadZipFile: {bad}); the file is damaged, restore it from another copy"
            )
        if is_crc:
            name = info.filename[len(records.prefix):]
            stored = records.small[name].decode("ascii", errors="replace")
            break
        folded.append((info.filename, info.CRC, info.file_size))
    if stored is None:
        return False
    if members[-1][0].filename != members[len(folded)][0].filename:
        raise IntegrityError(
            f"{path}: expected the content CRC to be the last member, found members after "
            "it; the file was modified after saving"
        )
    expected = f"{integrity.content_crc(folded):08x}"
    if stored != expected:
        raise IntegrityError(
            f"{path}: content CRC mismatch: the file records {_quote(stored)} but its members "
            f"give {expected!r}; members were added, removed or altered"
        )
    return True


def unpickle(records: ZipRecords, map_location: Any = None, **pickle_load_args: Any) -> Any:
    """Run ``data.pkl`` through torch's weights-only unpickler over the loaded records.

    Raises:
        pickle.UnpicklingError: the pickle needs something weights-only loading refuses.
    """
    from torch import _weights_only_unpickler
    from torch.serialization import _load

    pickle_load_args.setdefault("encoding", "utf-8")
    if not records.has_record("data.pkl"):
        raise IntegrityError(
            f"{records.path}: the archive has no {_quote(records.prefix + 'data.pkl')}; it is not "
            "a torch.save file (or a TorchScript archive: use torch.jit.load)"
        )
    if not pickle_load_args.keys() - {"encoding"}:
        from torchaux.checkpoint.formats.torch_save import fast_unpickler

        try:
            if map_location is None or str(map_location) == "cpu":
                return fast_unpickler.load_records(records, **pickle_load_args)
            return fast_unpickler.check_result(
                _load(records, map_location, fast_unpickler, **pickle_load_args)
            )
        except Exception as exc:  # noqa: BLE001 - not dropped: torch's unpickler answers below
            # Not a plain state dict (NotPlain), or damaged: the same bytes go
            # through torch's weights-only unpickler, whose result or error is
            # the answer (fast_unpickler's docstring).
            _log.debug("torchaux: %s: fast unpickler declined (%r); using torch's weights-only "
                       "unpickler", records.path, exc)
    try:
        return _load(records, map_location, _weights_only_unpickler, **pickle_load_args)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(
            f"Weights only load failed: {records.path} holds an object that weights-only loading "
            "refuses (torchaux loads only tensors and plain containers; use torch.load(..., "
            f"weights_only=False) only for a file you trust). WeightsUnpickler error: {exc}"
        ) from None

