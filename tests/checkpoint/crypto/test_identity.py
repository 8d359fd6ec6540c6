"""Checkpoint identity in the encrypted header (envelope v2; security review, issue #16 item 7).

Without it, any file encrypted under the same key could be swapped for
another, or rolled back to an older one, undetected.  ``enc_aad`` puts an
identity (e.g. run name and step) into the HMAC-authenticated header, which
every chunk is bound to; ``expected_id`` refuses a file carrying another one.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

import torch  # noqa: E402

import torchaux  # noqa: E402
from torchaux.checkpoint.crypto import header as crypto_header  # noqa: E402
from torchaux.checkpoint.crypto.envelope import (  # noqa: E402
    DecryptingReader,
    EncryptingWriter,
    describe_header,
)
from torchaux.errors import DecryptionError, IntegrityError  # noqa: E402

KEY = bytes(range(32))


def _save(path: Path, step: int, identity: str | bytes | None, **kwargs: object) -> Path:
    extra = {} if identity is None else {"enc_aad": identity}
    torchaux.save_checkpoint({"w": torch.full((4,), float(step))}, path, enc_key=KEY,
                             append_dict={"step": step}, **extra, **kwargs)
    return path


@pytest.mark.parametrize("identity", ["run7/step-1200", b"\x00\xffbinary", "\u03b1" * 512])
def test_identity_round_trips_and_is_checked(tmp_path: Path, identity: str | bytes) -> None:
    path = _save(tmp_path / "m.ckpt", 1, identity)
    raw = identity.encode() if isinstance(identity, str) else identity
    blob = path.read_bytes()
    assert blob[8:10] == b"\x00\x02" and struct.unpack(">H", blob[10:12])[0] == 94 + len(raw)
    assert torchaux.load_checkpoint(path, dec_key=KEY, expected_id=identity)["step"] == 1
    assert torchaux.load_checkpoint(path, dec_key=KEY)["step"] == 1  # checking is optional
    with pytest.raises(DecryptionError, match="not the expected checkpoint"):
        torchaux.load_checkpoint(path, dec_key=KEY, expected_id=raw[:-1] + bytes([raw[-1] ^ 1]))


def test_swapped_and_rolled_back_files_are_refused(tmp_path: Path) -> None:
    """The attack the review could not detect: same key, another (or older) file in place."""
    current = _save(tmp_path / "latest.ckpt", 2, "run7/step-2")
    old = _save(tmp_path / "old.ckpt", 1, "run7/step-1")
    shutil.copy(old, current)  # roll back
    with pytest.raises(DecryptionError, match="identity b'run7/step-1'.*expected b'run7/step-2'"):
        torchaux.load_checkpoint(current, dec_key=KEY, expected_id="run7/step-2")
    legacy = _save(tmp_path / "legacy.ckpt", 0, None)  # a version-1 file: no identity at all
    assert legacy.read_bytes()[8:10] == b"\x00\x01"
    shutil.copy(legacy, current)
    with pytest.raises(DecryptionError, match="carries no identity"):
        torchaux.load_checkpoint(current, dec_key=KEY, expected_id="run7/step-2")


def test_identity_cannot_be_edited_without_the_key(tmp_path: Path) -> None:
    """Rewriting the identity (CRC fixed, same length) fails the header HMAC."""
    path = _save(tmp_path / "m.ckpt", 1, "run7/step-1")
    blob = bytearray(path.read_bytes())
    at = 58 + len("run7/step-")
    blob[at : at + 1] = b"2"
    end = 58 + len("run7/step-1")
    blob[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(blob[:end])))
    path.write_bytes(bytes(blob))
    assert describe_header(io.BytesIO(bytes(blob)))["identity"] == "run7/step-2"
    with pytest.raises(DecryptionError, match="HMAC does not verify"):
        torchaux.load_checkpoint(path, dec_key=KEY, expected_id="run7/step-2")


def test_chunks_are_bound_to_the_identity() -> None:
    """A v1 header swapped onto v2 chunks (valid HMAC under the key) still fails: B_i differs."""
    def encrypt(identity: bytes | None) -> bytes:
        saved = crypto_header.random_bytes
        crypto_header.random_bytes = lambda n: bytes(n)  # same salt and nonces both times
        try:
            buf = io.BytesIO()
            with EncryptingWriter(buf, KEY, "AES-GCM", chunk_size=64, identity=identity) as w:
                w.write(b"weights" * 30)
            return buf.getvalue()
        finally:
            crypto_header.random_bytes = saved

    v2, v1 = encrypt(b"id"), encrypt(None)
    spliced = v1[:92] + v2[96:]
    with pytest.raises(DecryptionError):
        DecryptingReader(io.BytesIO(spliced), KEY).read()


@pytest.mark.parametrize(
    ("n", "size"), [(0, 94), (5, 94 + 4), (2000, 94 + 2000)], ids=["zero", "short", "too-long"]
)
def test_malformed_identity_length_is_an_integrity_error(n: int, size: int) -> None:
    buf = io.BytesIO()
    with EncryptingWriter(buf, KEY, "AES-GCM", identity=b"abcd") as w:
        w.write(b"x")
    head = bytearray(buf.getvalue()[:98])
    body = head[:56] + struct.pack(">H", n) + bytes(max(0, size - 94))
    body[10:12] = struct.pack(">H", size)
    forged = bytes(body) + struct.pack(">I", zlib.crc32(bytes(body))) + bytes(32)
    with pytest.raises(IntegrityError, match="identity length"):
        describe_header(io.BytesIO(forged))


def test_identity_arguments_are_checked_before_any_io(tmp_path: Path) -> None:
    target = tmp_path / "m.ckpt"
    with pytest.raises(ValueError, match="enc_aad .* needs enc_key"):
        torchaux.save_checkpoint({"w": torch.ones(1)}, target, enc_aad="x")
    with pytest.raises(ValueError, match="1 to 1024 bytes"):
        torchaux.save_checkpoint({"w": torch.ones(1)}, target, enc_key=KEY, enc_aad="x" * 1025)
    with pytest.raises(ValueError, match="1 to 1024 bytes"):
        torchaux.save_checkpoint({"w": torch.ones(1)}, target, enc_key=KEY, enc_aad=b"")
    with pytest.raises(TypeError, match="enc_aad must be a str or bytes"):
        torchaux.save_checkpoint({"w": torch.ones(1)}, target, enc_key=KEY, enc_aad=7)
    assert not os.listdir(tmp_path)
    _save(target, 1, "a")
    with pytest.raises(ValueError, match="expected_id .* needs dec_key"):
        torchaux.load_checkpoint(target, expected_id="a")
    with pytest.raises(TypeError, match="expected_id must be a str or bytes"):
        torchaux.load_checkpoint(target, dec_key=KEY, expected_id=1)


def test_describe_header_shows_the_identity(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.ckpt", 1, "run7/step-1")
    with open(path, "rb") as f:
        info = describe_header(f)
    assert info["version"] == 2 and info["identity"] == "run7/step-1"
    assert info["header_size"] == 94 + len("run7/step-1")


@pytest.mark.parametrize("mode", ["AES-CBC", "SM4-CBC"])
def test_identity_works_in_every_mode_and_format(tmp_path: Path, mode: str) -> None:
    key = KEY[:16]
    for fmt in ("ckpt", "safetensors"):
        path = tmp_path / f"m.{fmt}"
        torchaux.save_checkpoint({"w": torch.ones(3)}, path, enc_key=key, enc_mode=mode,
                                 format=fmt, enc_aad="id-1", crc_check=True)
        loaded = torchaux.load_checkpoint(path, dec_key=key, dec_mode=mode, expected_id="id-1",
                                          crc_check=True)
        assert torch.equal(loaded["w"], torch.ones(3))


@pytest.mark.multiprocess
def test_identity_through_the_process_saver(tmp_path: Path) -> None:
    from torchaux.checkpoint.engine.process_saver import ProcessSaver

    saver = ProcessSaver()
    try:
        path = tmp_path / "p.ckpt"
        torchaux.save_checkpoint({"w": torch.ones(2)}, path, enc_key=KEY, async_save="process",
                                 enc_aad="proc/1", saver=saver).wait(60)
    finally:
        saver.close()
    assert torchaux.load_checkpoint(path, dec_key=KEY, expected_id="proc/1")
