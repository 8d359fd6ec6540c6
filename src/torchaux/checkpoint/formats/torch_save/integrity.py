"""CRC-32 integrity for ``.ckpt`` (torch.save zip) checkpoints saved with ``crc_check=True``.

Every zip member already carries the CRC-32 of its bytes.  What a member CRC
cannot see is a member removed, added, reordered or resized.  So a
``crc_check`` save appends one more member, ``<archive>/.torchaux/crc32``:
eight lowercase hex digits of zlib's CRC-32 (IEEE polynomial, as MindSpore
uses, mindspore-spec.md §4.1) folded over, for every earlier member in
order, ``name (UTF-8) || 0x00 || member CRC (4 bytes LE) || size (8 bytes LE)``.
Verification re-reads every member (zipfile checks each member CRC) and
recomputes that fold.  ``torch.load`` ignores the extra member.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterable
from typing import IO

from torchaux.errors import IntegrityError

__all__ = ["CRC_MEMBER", "content_crc", "verify_zip_crc", "has_content_crc"]

#: Member name, below the archive folder, of the content CRC.
CRC_MEMBER = ".torchaux/crc32"

_READ_CHUNK = 8 << 20


def content_crc(members: Iterable[tuple[str, int, int]]) -> int:
    """Fold ``(name, crc, size)`` of each member, in order, into one CRC-32.

    >>> f"{content_crc([('a/data.pkl', 1, 2)]):08x}"
    '4bf6eb69'
    """
    crc = 0
    for name, member_crc, size in members:
        crc = zlib.crc32(name.encode("utf-8") + b"\0" + struct.pack("<IQ", member_crc, size), crc)
    return crc


_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22


def _open(source: IO[bytes] | bytes, path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # zipfile raises many types on damage; all mean "damaged"
        raise IntegrityError(
            f"{path}: expected a torch.save zip archive, found a damaged or truncated file "
            f"({exc}); restore it from another copy"
        ) from exc


def has_content_crc(source: IO[bytes] | bytes) -> bool:
    """Whether the archive carries a ``.torchaux/crc32`` member."""
    with _open(source, "<checkpoint>") as z:
        return any(i.filename.endswith("/" + CRC_MEMBER) for i in z.infolist())


def verify_zip_crc(source: IO[bytes] | bytes, path: str = "<checkpoint>") -> bool:
    """Check every member's CRC-32 and, if present, the content CRC.

    Returns:
        True if a content CRC member was present and matched, False if the
        archive has none (its member CRCs were still verified).

    Raises:
        IntegrityError: a member's bytes or the member list do not match.
    """
    if isinstance(source, bytes):
        # Our archives end with an end-of-central-directory record without a
        # comment; anything after it (or a comment) was appended later, which
        # zipfile and torch.load would silently ignore.
        tail = source[-_EOCD_SIZE:]
        if len(source) < _EOCD_SIZE or tail[:4] != _EOCD or tail[-2:] != b"\0\0":
            raise IntegrityError(
                f"{path}: expected the archive to end with its end-of-directory record, found "
                "extra bytes after it (appended data); the file was modified after saving"
            )
    try:
        return _verify(source, path)
    except IntegrityError:
        raise
    except Exception as exc:  # a damaged archive can fail zipfile in many ways
        raise IntegrityError(
            f"{path}: damaged archive ({type(exc).__name__}: {exc}); restore it from another copy"
        ) from exc


def _verify(source: IO[bytes] | bytes, path: str) -> bool:
    with _open(source, path) as z:
        infos = z.infolist()
        if infos and infos[0].header_offset != 0:
            # zipfile shifts offsets when bytes precede the archive it found at
            # the end, e.g. a second archive appended to the first.
            raise IntegrityError(
                f"{path}: expected the archive to start at byte 0, found "
                f"{infos[0].header_offset} bytes before it; the file was modified after saving"
            )
        members = []
        stored: str | None = None
        for info in infos:
            try:
                with z.open(info) as f:
                    data = b""
                    while chunk := f.read(_READ_CHUNK):
                        if info.filename.endswith("/" + CRC_MEMBER):
                            data += chunk
            except Exception as exc:  # BadZipFile, zlib.error, EOFError, ...
                raise IntegrityError(
                    f"{path}: member {info.filename!r} fails its CRC-32 check ({exc}); the "
                    "file is damaged, restore it from another copy"
                ) from exc
            if info.filename.endswith("/" + CRC_MEMBER):
                stored = data.decode("ascii", errors="replace")
                break
            members.append((info.filename, info.CRC, info.file_size))
        if stored is None:
            return False
        if infos[-1].filename != infos[len(members)].filename:
            raise IntegrityError(
                f"{path}: expected the content CRC to be the last member, found members after "
                "it; the file was modified after saving"
            )
        expected = f"{content_crc(members):08x}"
        if stored != expected:
            raise IntegrityError(
                f"{path}: content CRC mismatch: the file records {stored!r} but its members "
                f"give {expected!r}; members were added, removed or altered"
            )
        return True
