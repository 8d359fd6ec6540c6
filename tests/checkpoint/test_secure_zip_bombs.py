"""Compressed zip members are refused before decompression (security review, issue #16 item 2).

Checkpoint members are always stored (docs/FORMAT.md §1); a deflated member
let a 1 MB file load as a 1 GiB tensor, and a deflated CRC member was read
whole (quadratically) and echoed into the error message.  These tests build
small versions of those files and of other directory/local-header lies.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.checkpoint.formats.torch_save import integrity
from torchaux.cli.main import main
from torchaux.errors import IntegrityError

_BIG = 1 << 22  # 4 MiB of zeros: deflates to a few KiB


def _good(tmp_path: Path, crc_check: bool = True) -> bytes:
    path = tmp_path / "good.ckpt"
    torchaux.save_checkpoint({"w": torch.zeros(_BIG // 4)}, path, crc_check=crc_check)
    return path.read_bytes()


def _rezip(
    data: bytes, *, deflate: tuple[str, ...] = (), replace: dict[str, bytes] | None = None
) -> bytes:
    """``data``'s members rewritten by zipfile; names ending in a ``deflate`` suffix deflated."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            body = src.read(info.filename)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    body = new
            method = (
                zipfile.ZIP_DEFLATED if any(info.filename.endswith(s) for s in deflate)
                else zipfile.ZIP_STORED
            )
            z.writestr(info.filename, body, compress_type=method, compresslevel=9)
    return out.getvalue()


def _write(tmp_path: Path, data: bytes, name: str = "bomb.ckpt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("crc_check", [False, True])
@pytest.mark.parametrize("member", ["", "data.pkl", "data/0"], ids=["all", "pickle", "tensor"])
def test_deflated_members_are_refused(tmp_path: Path, crc_check: bool, member: str) -> None:
    """mk_bomb.py/ld_bomb.py: any deflated member is an IntegrityError, with or without crc_check."""
    bomb = _rezip(_good(tmp_path, crc_check=False), deflate=(member,))
    if member != "data.pkl":  # the point of a bomb: far smaller than what it inflates to
        assert len(bomb) < _BIG // 8
    path = _write(tmp_path, bomb)
    with pytest.raises(IntegrityError, match=r"is compressed \(method 8\).*refused before"):
        torchaux.load_checkpoint(path, crc_check=crc_check)


def test_deflated_crc_member_is_refused_with_a_short_message(tmp_path: Path) -> None:
    """t_crcbomb.py: the CRC member is checked by size first; nothing of it is echoed."""
    bomb = _rezip(_good(tmp_path), deflate=("crc32",), replace={".torchaux/crc32": b"0" * (16 << 20)})
    path = _write(tmp_path, bomb)
    with pytest.raises(IntegrityError) as info:
        torchaux.load_checkpoint(path, crc_check=True)
    text = str(info.value)
    assert "compressed" in text and len(text) < 600 and "0" * 20 not in text


def test_oversized_stored_crc_member_is_refused_by_size(tmp_path: Path) -> None:
    bomb = _rezip(_good(tmp_path), replace={".torchaux/crc32": b"0" * (1 << 20)})
    path = _write(tmp_path, bomb)
    with pytest.raises(IntegrityError, match="content CRC member holds 1048576 bytes; expected 8"):
        torchaux.load_checkpoint(path, crc_check=True)


def _central_entries(data: bytes) -> list[int]:
    at, found = 0, []
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        found.append(at)
        at += 4
    return found


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mapped"])
def test_local_header_that_says_deflated_is_refused(tmp_path: Path, mmap: bool) -> None:
    """The directory says stored, a local header says deflated: refused, whichever a reader trusts.

    ``mmap=True`` parses the local headers in place in the mapping (another
    code path than the reads of an unmapped load).
    """
    data = bytearray(_good(tmp_path, crc_check=False))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[-1]
    struct.pack_into("<H", data, info.header_offset + 8, 8)
    path = _write(tmp_path, bytes(data))
    with pytest.raises(IntegrityError, match=r"local header .* compressed \(method 8\)"):
        torchaux.load(path, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mapped"])
def test_directory_pointing_at_no_local_header_is_refused(tmp_path: Path, mmap: bool) -> None:
    data = bytearray(_good(tmp_path, crc_check=False))
    entry = _central_entries(bytes(data))[1]
    struct.pack_into("<I", data, entry + 42, 1)  # header offset: one byte into the first header
    with pytest.raises(IntegrityError, match="not a local header"):
        torchaux.load(_write(tmp_path, bytes(data)), mmap=mmap)


def test_sizes_that_disagree_are_refused(tmp_path: Path) -> None:
    data = bytearray(_good(tmp_path, crc_check=False))
    entry = _central_entries(bytes(data))[0]
    struct.pack_into("<I", data, entry + 24, 1 << 30)  # uncompressed size only
    with pytest.raises(IntegrityError, match="stored bytes but a size of 1073741824"):
        torchaux.load_checkpoint(_write(tmp_path, bytes(data)))


def test_member_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    data = bytearray(_good(tmp_path, crc_check=False))
    entry = _central_entries(bytes(data))[0]
    struct.pack_into("<II", data, entry + 20, 1 << 30, 1 << 30)  # both sizes
    with pytest.raises(IntegrityError, match="past the end of the"):
        torchaux.load_checkpoint(_write(tmp_path, bytes(data)))


def test_overlapping_members_are_refused() -> None:
    """Two directory entries naming the same bytes (a stored-member 'bomb') are refused."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("a/x", bytes(100))
    data = bytearray(out.getvalue())
    entries = _central_entries(bytes(data))
    central = bytes(data[entries[0] : data.find(b"PK\x05\x06")])
    eocd = data.find(b"PK\x05\x06")
    doubled = bytes(data[:entries[0]]) + central + central.replace(b"a/x", b"a/y")
    tail = bytearray(data[eocd:])
    struct.pack_into("<HHI", tail, 8, 2, 2, 2 * len(central))
    with pytest.raises(IntegrityError, match="inside member"):
        integrity.check_members(doubled + bytes(tail))


def test_verify_never_says_ok_for_a_bomb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`torchaux verify` exits 1 with a short reason; `inspect` refuses too."""
    path = _write(tmp_path, _rezip(_good(tmp_path, crc_check=False), deflate=("",)))
    assert main(["verify", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out and "compressed" in err
    assert main(["inspect", str(path)]) == 1
    assert "compressed" in capsys.readouterr().err


def test_torch_load_failures_are_quoted_briefly(tmp_path: Path) -> None:
    """A damaged pickle's error text is quoted with !r and capped."""
    data = _good(tmp_path, crc_check=False)
    evil = "\x1b[2J" + "A" * 5000
    pickled = b"\x80\x02c" + evil.encode() + b"\nx\n."  # GLOBAL of a huge, escape-laden name
    bomb = _rezip(data, replace={"data.pkl": pickled})
    with pytest.raises(IntegrityError) as info:
        torchaux.load_checkpoint(_write(tmp_path, bomb))
    text = str(info.value)
    assert "\x1b" not in text and len(text) < 600


def test_member_crc_is_still_checked(tmp_path: Path) -> None:
    """A stored member whose bytes changed fails its CRC-32 (the existing check still runs)."""
    data = bytearray(_good(tmp_path, crc_check=True))
    info = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist() if i.file_size > 1000)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len] ^= 1
    with pytest.raises(IntegrityError, match="fails its CRC-32"):
        torchaux.load_checkpoint(_write(tmp_path, bytes(data)), crc_check=True)
