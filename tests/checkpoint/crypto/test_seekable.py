"""crypto/seekable.py: random access to the verified plaintext; every chunk is checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torchaux.checkpoint.crypto.envelope import EncryptingWriter
from torchaux.checkpoint.crypto.seekable import EncryptedSource
from torchaux.checkpoint.formats.fill import Target, fill
from torchaux.errors import DecryptionError, IntegrityError

KEY = bytes(range(16))
CHUNK = 64


def _write(path: Path, data: bytes, mode: str) -> bytes:
    with open(path, "wb") as f, EncryptingWriter(f, KEY, mode, chunk_size=CHUNK) as w:
        w.write(data)
    return path.read_bytes()


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC", "SM4-CBC"])
@pytest.mark.parametrize("size", [0, 1, CHUNK, 10 * CHUNK + 7])
def test_reads_and_fills_match_the_plaintext(tmp_path: Path, mode: str, size: int) -> None:
    data = os.urandom(size)
    _write(tmp_path / "e", data, mode)
    with open(tmp_path / "e", "rb") as f:
        src = EncryptedSource(f.fileno(), "e", KEY, mode)
        assert src.size == size
        assert src.read(0, size) == data
        if size > 10:
            assert src.read(size // 3, size // 2) == data[size // 3 : size // 3 + size // 2]
        spans = [(0, min(size, 5)), (min(size, 5), size)] if size else []
        # A target covering whole chunks (GCM decrypts straight into it) and a short one.
        targets = [Target(a, memoryview(bytearray(b - a))) for a, b in spans]
        fill(src, targets, workers=3)
        assert b"".join(bytes(t.view) for t in targets) == data


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
def test_every_chunk_is_verified_even_without_targets(tmp_path: Path, mode: str) -> None:
    raw = bytearray(_write(tmp_path / "e", os.urandom(8 * CHUNK + 3), mode))
    raw[92 + 2 * (CHUNK + 64) + 20] ^= 1  # inside chunk 2 (CBC records are C + 64 bytes)
    (tmp_path / "e").write_bytes(bytes(raw))
    with open(tmp_path / "e", "rb") as f:
        src = EncryptedSource(f.fileno(), "e", KEY, mode)
        src.read(0, 10)  # chunk 0 is fine
        with pytest.raises(DecryptionError, match="failed authentication"):
            fill(src, [])  # no destination at all: chunk 2 is still opened and checked


def test_cut_at_a_chunk_boundary_is_truncation(tmp_path: Path) -> None:
    raw = _write(tmp_path / "e", os.urandom(4 * CHUNK), "AES-GCM")
    (tmp_path / "e").write_bytes(raw[: 92 + 2 * (CHUNK + 16)])
    with open(tmp_path / "e", "rb") as f, pytest.raises(IntegrityError, match="final chunk is missing"):
        EncryptedSource(f.fileno(), "e", KEY, "AES-GCM")


def test_wrong_key(tmp_path: Path) -> None:
    _write(tmp_path / "e", b"x" * 100, "AES-GCM")
    with open(tmp_path / "e", "rb") as f, pytest.raises(DecryptionError, match="wrong key"):
        EncryptedSource(f.fileno(), "e", bytes(16), "AES-GCM")


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC", "SM4-CBC"])
def test_peek_decrypts_any_range_like_read(tmp_path: Path, mode: str) -> None:
    data = os.urandom(6 * CHUNK + 5)
    _write(tmp_path / "e", data, mode)
    with open(tmp_path / "e", "rb") as f:
        src = EncryptedSource(f.fileno(), "e", KEY, mode)
        for at, n in [(0, 30), (17, 30), (CHUNK - 7, 30), (2 * CHUNK + 33, 1), (5 * CHUNK, CHUNK + 5)]:
            assert src.peek(at, n) == data[at : at + n], (at, n)
