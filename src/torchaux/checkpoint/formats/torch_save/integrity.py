"""CRC-32 integrity for ``.ckpt`` (torch.save zip) checkpoints saved with ``crc_check=True``.

Every zip member already carries the CRC-32 of its bytes.  What a member CRC
cannot see is a member removed, added, reordered or resized.  So a
``crc_check`` save appends one more member, ``<archive>/.torchaux/crc32``:
eight lowercase hex digits of zlib's CRC-32 (IEEE polynomial, as MindSpore
uses, mindspore-spec.md §4.1) folded over, for every earlier member in
order, ``name (UTF-8) || 0x00 || member CRC (4 bytes LE) || size (8 bytes LE)``.
Verification re-reads every member (zipfile checks each member CRC) and
recomputes that fold.  ``torch.load`` ignores the extra member.

Every member of our archives is stored uncompressed (docs/FORMAT.md §1), so
:func:`check_members` refuses, from the directory and local headers alone and
before anything is decompressed, any compressed or encrypted member, sizes
that disagree, and data that runs past the file or overlaps another member:
a 1 MB file could otherwise inflate into gigabytes inside ``torch.load``
(security review, issue #16 item 2).  The content CRC member is 8 bytes and
is read with that bound, and messages quote file content only shortened,
with ``!r``.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterable
from typing import IO

from torchaux.checkpoint.crc32 import crc32
from torchaux.errors import IntegrityError

__all__ = ["CRC_MEMBER", "content_crc", "verify_zip_crc", "has_content_crc", "check_members"]

#: Member name, below the archive folder, of the content CRC.
CRC_MEMBER = ".torchaux/crc32"

_READ_CHUNK = 8 << 20
#: Bytes of the content CRC member: eight hex digits.
_CRC_MEMBER_SIZE = 8
# Local file header (APPNOTE.TXT 4.3.7): signature, version, flags, method,
# time, date, CRC-32, compressed size, uncompressed size, name and extra lengths.
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
# Longest quote of file content (a member name) in an error message.
_QUOTE = 80


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def _brief(exc: BaseException) -> str:
    """``exc`` for a message: type and at most a line of its text, quoted."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {_quote(text)}"


def content_crc(members: Iterable[tuple[str, int, int]]) -> int:
    """Fold ``(name, crc, size)`` of each member, in order, into one CRC-32.

    >>> f"{content_crc([('a/data.pkl', 1, 2)]):08x}"
    '4bf6eb69'
    """
    crc = 0
    for name, member_crc, size in members:
        crc = crc32(name.encode("utf-8") + b"\0" + struct.pack("<IQ", member_crc, size), crc)
    return crc


_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22


def _open(source: IO[bytes] | bytes, path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # zipfile raises many types on damage; all mean "damaged"
        raise IntegrityError(
            f"{path}: expected a torch.save zip archive, found a damaged or truncated file "
            f"({_brief(exc)}); restore it from another copy"
        ) from exc


def check_members(
    data: bytes | bytearray | memoryview | IO[bytes], path: str = "<checkpoint>"
) -> list[tuple[zipfile.ZipInfo, int]]:
    """Refuse an archive whose members are not stored as torch.save/torchaux store them.

    Reads only the central directory and each local header (nothing is
    decompressed): every member must be stored (method 0, no encryption),
    with equal compressed and uncompressed sizes in both headers, its data
    inside the file and not overlapping another member's.  ``data`` is the
    archive's bytes or a seekable binary file holding it.

    Returns:
        ``(member, offset of its data)`` for every member, in directory order.

    Raises:
        IntegrityError: the first member that breaks a rule, named (shortened).

    Example:
        >>> import zipfile
        >>> buf = io.BytesIO()
        >>> with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        ...     z.writestr("a/data.pkl", bytes(1000))
        >>> check_members(buf.getvalue())
        Traceback (most recent call last):
        torchaux.errors.IntegrityError: <checkpoint>: member 'a/data.pkl' is compressed (method 8)...
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        blob = bytes(data)  # no copy for bytes (the common case)
        view = memoryview(blob)
        size = len(view)
        source: IO[bytes] | bytes = blob

        def local(at: int) -> tuple[int, ...]:
            return _LOCAL.unpack_from(view, at)
    else:
        source, size = data, data.seek(0, 2)
        in_place = getattr(data, "in_place", None)  # the archive's bytes in place (a mapping)

        def local(at: int) -> tuple[int, ...]:
            if in_place is not None:  # a seek and a read per member cost ~4 us: 0.5 ms a load
                return _LOCAL.unpack_from(in_place, at)
            data.seek(at)
            return _LOCAL.unpack(data.read(_LOCAL.size))
    with _open(source, path) as z:  # parses the central directory only
        infos = z.infolist()
    spans = []
    out = []
    for info in infos:
        name = _quote(info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            raise IntegrityError(
                f"{path}: member {name} is compressed (method {info.compress_type}); checkpoint "
                "members are always stored uncompressed, so this file was crafted or is not a "
                "checkpoint (refused before decompressing anything)"
            )
        if info.flag_bits & 0x1:
            raise IntegrityError(f"{path}: member {name} is zip-encrypted; not a checkpoint")
        if info.compress_size != info.file_size:
            raise IntegrityError(
                f"{path}: member {name} records {info.compress_size} stored bytes but a size "
                f"of {info.file_size}; a stored member has one size: the directory is damaged"
            )
        at = info.header_offset
        if at < 0 or at + _LOCAL.size > size:
            raise IntegrityError(
                f"{path}: member {name} has its header at byte {at}, outside the {size}-byte "
                "file; the file is truncated or damaged"
            )
        sig, _, _, method, _, _, _, _, _, name_len, extra_len = local(at)
        if sig != _LOCAL_SIG or method != 0:
            raise IntegrityError(
                f"{path}: member {name}'s local header at byte {at} is "
                + ("not a local header" if sig != _LOCAL_SIG else f"compressed (method {method})")
                + "; refused before decompressing anything"
            )
        start = at + _LOCAL.size + name_len + extra_len
        end = start + info.file_size
        if end > size:
            raise IntegrityError(
                f"{path}: member {name} claims {info.file_size} bytes from byte {start}, past "
                f"the end of the {size}-byte file; the file is truncated or was crafted"
            )
        spans.append((at, end, name))
        out.append((info, start))
    spans.sort()
    for (_, end, name), (at, _, other) in zip(spans, spans[1:]):
        if at < end:
            raise IntegrityError(
                f"{path}: member {other} starts at byte {at}, inside member {name} (ends at "
                f"{end}); members of a checkpoint never overlap: the file was crafted"
            )
    return out


def has_content_crc(source: IO[bytes] | bytes) -> bool:
    """Whether the archive carries a ``.torchaux/crc32`` member."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        check_members(source)
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
    if not isinstance(source, (bytes, bytearray, memoryview)):
        source = source.read()
    if isinstance(source, (bytes, bytearray, memoryview)):
        # Our archives end with an end-of-central-directory record without a
        # comment; anything after it (or a comment) was appended later, which
        # zipfile and torch.load would silently ignore.
        tail = source[-_EOCD_SIZE:]
        if len(source) < _EOCD_SIZE or tail[:4] != _EOCD or tail[-2:] != b"\0\0":
            raise IntegrityError(
                f"{path}: expected the archive to end with its end-of-directory record, found "
                "extra bytes after it (appended data); the file was modified after saving"
            )
    check_members(source, path)  # before anything is decompressed or read
    try:
        return _verify(bytes(source), path)
    except IntegrityError:
        raise
    except Exception as exc:  # a damaged archive can fail zipfile in many ways
        raise IntegrityError(
            f"{path}: damaged archive ({_brief(exc)}); restore it from another copy"
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
            is_crc = info.filename.endswith("/" + CRC_MEMBER)
            if is_crc and info.file_size != _CRC_MEMBER_SIZE:
                raise IntegrityError(
                    f"{path}: the content CRC member holds {info.file_size} bytes; expected "
                    f"{_CRC_MEMBER_SIZE} hex digits: the file was modified after saving"
                )
            try:
                with z.open(info) as f:
                    if is_crc:
                        # A fixed bound, whatever the directory claims; reaching the
                        # end makes zipfile check the member's CRC-32.
                        data = f.read(_CRC_MEMBER_SIZE + 1)
                    else:
                        while f.read(_READ_CHUNK):
                            pass
            except Exception as exc:  # BadZipFile, zlib.error, EOFError, ...
                raise IntegrityError(
                    f"{path}: member {_quote(info.filename)} fails its CRC-32 check "
                    f"({_brief(exc)}); the file is damaged, restore it from another copy"
                ) from exc
            if is_crc:
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
                f"{path}: content CRC mismatch: the file records {_quote(stored)} but its members "
                f"give {expected!r}; members were added, removed or altered"
            )
        return True
