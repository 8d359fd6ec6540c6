"""Streaming checkpoint encryption: round trips, layout, tamper detection, memory, threads."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import random
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cryptography")

import torch  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402

import torchaux  # noqa: E402
from torchaux.checkpoint.crypto import header as crypto_header  # noqa: E402
from torchaux.checkpoint.crypto.envelope import (  # noqa: E402
    KEY_SIZES,
    DecryptingReader,
    EncryptingWriter,
    decrypt_stream,
    describe_header,
    is_encrypted,
    validate_key,
)
from torchaux.errors import DecryptionError, IntegrityError, UnsupportedFormatError  # noqa: E402

KEYS = [(mode, size) for mode, sizes in KEY_SIZES.items() for size in sizes]
CHUNK = 64
HEADER = 92


def _key(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def _data(n: int, seed: int = 2) -> bytes:
    return random.Random(seed).randbytes(n)


def _odd_pieces(data: bytes) -> Iterator[memoryview]:
    view, pos, step = memoryview(data), 0, 1
    while pos < len(view):
        yield view[pos : pos + step]
        pos += step
        step = step * 7 % 97 + 1


def _encrypt(
    data: bytes, key: bytes, mode: str, *, chunk: int = CHUNK, workers: int = 1, odd: bool = False
) -> bytes:
    out = io.BytesIO()
    with EncryptingWriter(out, key, mode, chunk_size=chunk, workers=workers) as writer:
        for piece in _odd_pieces(data) if odd else [memoryview(data)]:
            assert writer.write(piece) == len(piece)
    return out.getvalue()


def _decrypt(blob: bytes, key: bytes, mode: str | None = None, workers: int = 1) -> bytes:
    out = io.BytesIO()
    n = decrypt_stream(io.BytesIO(blob), out, key, mode, workers=workers)
    assert n == len(out.getvalue())
    return out.getvalue()


def _full_record(mode: str, chunk: int = CHUNK) -> int:
    return chunk + (16 if mode == "AES-GCM" else 64)


class _Sink:
    """Counts bytes written without keeping them."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        self.n += len(memoryview(data).cast("B"))
        return len(memoryview(data).cast("B"))

    def flush(self) -> None:
        pass


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Salts, nonce prefixes and IVs come from a seeded generator (reproducible bytes)."""
    monkeypatch.setattr(crypto_header, "random_bytes", random.Random(0).randbytes)


# -- key and mode validation -------------------------------------------------


@pytest.mark.parametrize(("mode", "size"), KEYS)
def test_validate_key_accepts_every_valid_length(mode: str, size: int) -> None:
    """Every documented key length of every mode validates."""
    assert validate_key(bytes(size), mode) is None


@pytest.mark.parametrize("key", ["k" * 16, bytearray(16), None, 16, memoryview(bytes(16))])
def test_validate_key_rejects_non_bytes(key: object) -> None:
    """A key that is not bytes is a TypeError naming the accepted lengths."""
    with pytest.raises(TypeError, match="must be bytes of length 16 or 24 or 32"):
        validate_key(key, "AES-GCM")


@pytest.mark.parametrize(("mode", "size"), [("AES-GCM", 8), ("AES-CBC", 31), ("SM4-CBC", 32)])
def test_validate_key_rejects_wrong_length(mode: str, size: int) -> None:
    """A wrong key length is a ValueError that lists the valid lengths."""
    valid = " or ".join(map(str, KEY_SIZES[mode]))
    with pytest.raises(ValueError, match=f"needs a key of {valid} bytes; got {size}"):
        validate_key(bytes(size), mode)


def test_validate_key_rejects_unknown_or_non_str_mode() -> None:
    """An unknown mode is a ValueError listing the modes; a non-str mode is a TypeError."""
    with pytest.raises(ValueError, match=r"'AES-CTR'.*AES-CBC.*AES-GCM.*SM4-CBC"):
        validate_key(bytes(16), "AES-CTR")
    with pytest.raises(TypeError, match="mode must be a str"):
        validate_key(bytes(16), None)


class _NoIO:
    def write(self, data: Any) -> int:
        raise AssertionError("wrote before validating")

    def read(self, n: int = -1) -> bytes:
        raise AssertionError("read before validating")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"key": "x" * 16}, TypeError),
        ({"key": bytes(15)}, ValueError),
        ({"mode": "aes-gcm"}, ValueError),
        ({"chunk_size": 100}, ValueError),
        ({"chunk_size": 0}, ValueError),
        ({"chunk_size": 64.0}, TypeError),
        ({"workers": 0}, ValueError),
        ({"workers": "2"}, TypeError),
    ],
)
def test_writer_validates_arguments_before_any_io(kwargs: dict[str, Any], error: type) -> None:
    """Bad writer arguments raise TypeError/ValueError before ``raw`` is touched."""
    args: dict[str, Any] = {"key": bytes(16), "mode": "AES-GCM", "chunk_size": 64, "workers": 1}
    args.update(kwargs)
    with pytest.raises(error):
        EncryptingWriter(_NoIO(), args.pop("key"), args.pop("mode"), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "mode", "error"),
    [
        ("k" * 16, None, TypeError),
        (bytes(20), None, ValueError),
        (bytes(32), "SM4-CBC", ValueError),
    ],
)
def test_reader_validates_arguments_before_any_io(key: Any, mode: Any, error: type) -> None:
    """Bad reader arguments raise TypeError/ValueError before ``raw`` is read."""
    with pytest.raises(error):
        DecryptingReader(_NoIO(), key, mode=mode)  # type: ignore[arg-type]


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
@pytest.mark.parametrize(("mode", "key_size"), KEYS)
@pytest.mark.parametrize("odd", [False, True], ids=["one-write", "odd-writes"])
@pytest.mark.parametrize("workers", [1, 3])
def test_round_trip(mode: str, key_size: int, size: int, odd: bool, workers: int) -> None:
    """Plaintext of every size around the chunk size comes back byte for byte."""
    data, key = _data(size), _key(key_size)
    blob = _encrypt(data, key, mode, odd=odd, workers=workers)
    assert _decrypt(blob, key, mode) == data
    assert _decrypt(blob, key, None, workers=3) == data


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_round_trip_default_chunk_huge_memoryview(mode: str) -> None:
    """One multi-chunk memoryview write with the default 4 MiB chunks round-trips."""
    data = _data((9 << 20) + 5)
    key = _key(16)
    out = io.BytesIO()
    with EncryptingWriter(out, key, mode, workers=2) as writer:
        writer.write(memoryview(data))
    assert describe_header(io.BytesIO(out.getvalue()))["chunk_size"] == 4 << 20
    assert _decrypt(out.getvalue(), key, workers=2) == data


def test_write_accepts_typed_and_multidimensional_buffers() -> None:
    """write() takes any C-contiguous buffer (the zip writer passes storages) and counts bytes."""
    array = memoryview(bytearray(range(48))).cast("B", (3, 16)).cast("I")
    out = io.BytesIO()
    with EncryptingWriter(out, bytes(16), "AES-CBC", chunk_size=32, workers=1) as writer:
        assert writer.write(array) == 48
    assert _decrypt(out.getvalue(), bytes(16)) == bytes(range(48))


@pytest.mark.parametrize("workers", [1, 3])
def test_reader_read_readinto_and_eof(workers: int) -> None:
    """read(n), readinto and read() return the plaintext in order, then b'' at the end."""
    data = _data(1000)
    blob = _encrypt(data, _key(32), "AES-GCM")
    reader = DecryptingReader(io.BytesIO(blob), _key(32), workers=workers)
    assert reader.readable()
    assert not reader.seekable()
    first = reader.read(3)
    buf = bytearray(100)
    n = reader.readinto(buf)
    rest = reader.read()
    assert first + bytes(buf[:n]) + rest == data
    assert reader.read(10) == b""
    assert reader.readinto(bytearray(4)) == 0
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read(1)


def test_raw_with_short_reads_and_writes() -> None:
    """A raw file that moves one byte per call (read() only, no readinto) still works."""

    class Trickle:
        def __init__(self, data: bytes = b"") -> None:
            self.data, self.pos, self.out = data, 0, bytearray()

        def write(self, b: Any) -> int:
            self.out += bytes(memoryview(b)[:1])
            return 1

        def flush(self) -> None:
            pass

        def read(self, n: int) -> bytes:
            self.pos += 1
            return self.data[self.pos - 1 : self.pos]

    data = _data(300)
    sink = Trickle()
    with EncryptingWriter(sink, bytes(16), "SM4-CBC", chunk_size=48, workers=2) as writer:
        writer.write(data)
    assert _decrypt(bytes(sink.out), bytes(16)) == data
    assert DecryptingReader(Trickle(bytes(sink.out)), bytes(16), workers=2).read() == data


def test_torch_checkpoint_through_encrypting_writer() -> None:
    """save_async's zip writer streams into the writer; the plaintext loads with torch.load."""
    state = {"w": torch.randn(300, 70), "b": torch.arange(5), "e": torch.zeros(0)}
    out = io.BytesIO()
    writer = EncryptingWriter(out, _key(32), "AES-CBC", chunk_size=4096, workers=2)
    torchaux.save_async(state, writer).wait()
    writer.close()
    assert is_encrypted(out.getvalue()[:8])
    loaded = torch.load(io.BytesIO(_decrypt(out.getvalue(), _key(32))), weights_only=True)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# -- header and layout ---------------------------------------------------------


@pytest.mark.parametrize(("mode", "key_size"), KEYS)
def test_header_describes_the_stream(mode: str, key_size: int) -> None:
    """describe_header reports mode, key bits and chunk size without the key."""
    blob = _encrypt(b"x", _key(key_size), mode, chunk=160)
    info = describe_header(io.BytesIO(blob))
    assert info == {
        "format": "torchaux-encrypted",
        "version": 1,
        "mode": mode,
        "key_bits": key_size * 8,
        "kdf": "HKDF-SHA256",
        "chunk_size": 160,
        "header_size": HEADER,
        "identity": None,
    }


def test_is_encrypted_sniffs_the_magic() -> None:
    """is_encrypted is true for our output only (not zips, short or empty prefixes)."""
    torch_zip = io.BytesIO()
    torch.save({"a": 1}, torch_zip)
    assert is_encrypted(_encrypt(b"", bytes(16), "AES-GCM")[:8])
    assert not is_encrypted(torch_zip.getvalue()[:8])
    assert not is_encrypted(b"\x89TAUX")
    assert not is_encrypted(b"")


@pytest.mark.parametrize("mode", list(KEY_SIZES))
@pytest.mark.parametrize("size", [0, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
def test_file_length_follows_the_documented_layout(mode: str, size: int) -> None:
    """File length = 92 + full records + one shorter final record, as documented."""
    blob = _encrypt(_data(size), bytes(16), mode)
    full, tail = divmod(size, CHUNK)
    final = tail + 16 if mode == "AES-GCM" else 16 + (tail // 16 + 1) * 16 + 32
    assert len(blob) == HEADER + full * _full_record(mode) + final
    assert final < _full_record(mode)


def _documented_decrypt(blob: bytes, key: bytes) -> bytes:
    """Decrypt using only the layout in the crypto module docstring and cryptography primitives."""
    header = blob[:HEADER]
    assert header[:8] == b"\x89TAUXE\r\n"
    assert struct.unpack(">HHBBBB", header[8:16]) == (1, 92, header[12], len(key), 1, 0)
    assert zlib.crc32(header[:56]) == int.from_bytes(header[56:60], "big")
    mode = {1: "AES-GCM", 2: "AES-CBC", 3: "SM4-CBC"}[header[12]]
    chunk, salt, prefix = int.from_bytes(header[16:20], "big"), header[20:52], header[52:56]

    def kdf(purpose: bytes, n: int) -> bytes:
        info = b"torchaux-encryption/v1/" + mode.encode() + b"/" + purpose
        return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(key)

    assert hmac.digest(kdf(b"header-mac", 32), header[:60], "sha256") == header[60:]
    header_hash, enc_key = hashlib.sha256(header).digest(), kdf(b"cipher-key", len(key))
    full = chunk + (16 if mode == "AES-GCM" else 64)
    plain, pos, index = [], HEADER, 0
    while True:
        record = blob[pos : pos + full]
        pos += len(record)
        final = len(record) < full
        binding = header_hash + struct.pack(">QB", index, final)
        if mode == "AES-GCM":
            nonce = prefix + struct.pack(">Q", index)
            plain.append(AESGCM(enc_key).decrypt(nonce, record, binding))
        else:
            iv, ct, tag = record[:16], record[16:-32], record[-32:]
            assert hmac.digest(kdf(b"mac-key", 32), binding + iv + ct, "sha256") == tag
            algorithm = algorithms.AES(enc_key) if mode == "AES-CBC" else algorithms.SM4(enc_key)
            padded = Cipher(algorithm, modes.CBC(iv)).decryptor().update(ct)
            plain.append(padded[: -padded[-1]])
        if final:
            assert pos == len(blob)
            return b"".join(plain)
        index += 1


@pytest.mark.parametrize(("mode", "key_size"), KEYS)
@pytest.mark.parametrize("size", [0, CHUNK, 4 * CHUNK + 9])
def test_documented_layout_decrypts_the_file(mode: str, key_size: int, size: int) -> None:
    """An independent decoder written from the documented layout recovers the plaintext."""
    data, key = _data(size), _key(key_size)
    assert _documented_decrypt(_encrypt(data, key, mode), key) == data


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(
    ("mode", "digest"),
    [
        ("AES-GCM", "48f7a9703235c749c50ccf2e89e7590e7f8d4e8b7cdc0a4f8a8324614d16d3e1"),
        ("AES-CBC", "0f243e42d6866365676233fdf90b611f252bc38cce491393fc38a0885dba36d4"),
        ("SM4-CBC", "f739dee85d1b4387dfe1a7b3e1f1e44aaf749adf407ac76905119dfd72f7a93f"),
    ],
)
def test_golden_bytes(mode: str, digest: str) -> None:
    """With fixed randomness the output bytes are pinned (a format change must update these)."""
    blob = _encrypt(bytes(range(200)), bytes(range(16)), mode)
    assert hashlib.sha256(blob).hexdigest() == digest


def test_future_version_is_unsupported_not_corrupt() -> None:
    """A newer format version with a valid CRC raises UnsupportedFormatError naming the upgrade."""
    blob = bytearray(_encrypt(b"abc", bytes(16), "AES-GCM"))
    blob[8:10] = (3).to_bytes(2, "big")
    blob[56:60] = zlib.crc32(bytes(blob[:56])).to_bytes(4, "big")
    with pytest.raises(UnsupportedFormatError, match="version 3 .*upgrade torchaux"):
        DecryptingReader(io.BytesIO(bytes(blob)), bytes(16))


def test_plain_zip_is_reported_as_not_encrypted() -> None:
    """Decrypting an unencrypted torch.save file says so and what to do instead."""
    plain = io.BytesIO()
    torch.save({"a": torch.ones(2)}, plain)
    with pytest.raises(IntegrityError, match="not encrypted.*load it without a key"):
        DecryptingReader(io.BytesIO(plain.getvalue()), bytes(16))


# -- wrong key, wrong mode -----------------------------------------------------


@pytest.mark.parametrize(("mode", "key_size"), KEYS)
def test_wrong_key_is_detected_at_the_header(mode: str, key_size: int) -> None:
    """Another key of the same length fails the header HMAC before any chunk is read."""
    blob = _encrypt(_data(500), _key(key_size, seed=1), mode)
    with pytest.raises(DecryptionError, match="wrong key: the header's HMAC does not verify"):
        DecryptingReader(io.BytesIO(blob), _key(key_size, seed=9))


def test_wrong_key_length_says_which_length_was_used() -> None:
    """A key of another length is a DecryptionError naming the file's key length."""
    blob = _encrypt(b"abc", _key(32), "AES-GCM")
    with pytest.raises(DecryptionError, match="32-byte AES-GCM key, got a 16-byte key"):
        DecryptingReader(io.BytesIO(blob), _key(16))


def test_wrong_mode_names_the_files_mode() -> None:
    """Asking for another mode is a DecryptionError that names the mode the file uses."""
    blob = _encrypt(b"abc", _key(16), "SM4-CBC")
    with pytest.raises(DecryptionError, match="encrypted with SM4-CBC, but AES-CBC was requested"):
        DecryptingReader(io.BytesIO(blob), _key(16), mode="AES-CBC")
    assert DecryptingReader(io.BytesIO(blob), _key(16), mode="SM4-CBC").read() == b"abc"


# -- tampering, truncation, appending, reordering ------------------------------


def _small_file(mode: str) -> bytes:
    return _encrypt(_data(2 * 16 + 7), bytes(16), mode, chunk=16)


def _fails(blob: bytes, workers: int = 1) -> IntegrityError:
    with pytest.raises(IntegrityError) as info:
        _decrypt(blob, bytes(16), workers=workers)
    return info.value


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_every_single_byte_flip_is_detected(mode: str) -> None:
    """Changing any one byte anywhere (header, ciphertext, IV, tag) raises, exhaustively."""
    blob = _small_file(mode)
    for pos in range(len(blob)):
        for mask in (0x01, 0x80):
            damaged = bytearray(blob)
            damaged[pos] ^= mask
            _fails(bytes(damaged))


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_truncation_at_every_byte_is_detected(mode: str) -> None:
    """Cutting the file at any byte (inside the header or any record) raises."""
    blob = _small_file(mode)
    for end in range(len(blob)):
        _fails(blob[:end])


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_truncation_at_chunk_boundaries_reports_missing_final_chunk(mode: str) -> None:
    """A cut exactly between records is an IntegrityError saying the final chunk is missing."""
    blob = _encrypt(_data(5 * CHUNK), bytes(16), mode)
    for records in range(6):
        error = _fails(blob[: HEADER + records * _full_record(mode)], workers=2)
        assert "final chunk is missing" in str(error)
        assert not isinstance(error, DecryptionError)


@pytest.mark.parametrize("mode", list(KEY_SIZES))
@pytest.mark.parametrize(
    "extra", [b"\0", bytes(15), bytes(16), bytes(CHUNK + 64)], ids=["1", "15", "16", "record"]
)
def test_appended_bytes_are_detected(mode: str, extra: bytes) -> None:
    """Bytes after the final record (any length) make decryption fail."""
    blob = _encrypt(_data(3 * CHUNK + 3), bytes(16), mode)
    _fails(blob + extra)
    _fails(blob + blob[-_full_record(mode) :])


def _records(blob: bytes, mode: str) -> list[bytes]:
    full = _full_record(mode)
    return [blob[i : i + full] for i in range(HEADER, len(blob), full)]


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_reordered_duplicated_or_dropped_chunks_are_detected(mode: str) -> None:
    """Swapping, duplicating or dropping whole records fails authentication."""
    blob = _encrypt(_data(4 * CHUNK + 10), bytes(16), mode)
    head, recs = blob[:HEADER], _records(blob, mode)
    variants = [
        [recs[1], recs[0], *recs[2:]],
        [recs[0], recs[0], *recs[1:]],
        [recs[0], *recs[2:]],
        [*recs[:3], recs[4], recs[3]],
        [recs[0], recs[1], recs[2], recs[4]],
    ]
    for variant in variants:
        error = _fails(head + b"".join(variant))
        assert isinstance(error, DecryptionError)


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_records_cannot_move_between_files_with_the_same_key(mode: str) -> None:
    """A record from another file encrypted under the same key fails (header binding)."""
    one = _encrypt(_data(3 * CHUNK, seed=5), bytes(16), mode)
    two = _encrypt(_data(3 * CHUNK, seed=6), bytes(16), mode)
    recs = _records(one, mode)
    recs[1] = _records(two, mode)[1]
    assert isinstance(_fails(one[:HEADER] + b"".join(recs)), DecryptionError)


def test_errors_surface_in_order_and_stick() -> None:
    """Bytes before a damaged chunk are returned; the error then repeats on every read."""
    data = _data(6 * CHUNK)
    blob = bytearray(_encrypt(data, bytes(16), "AES-GCM"))
    blob[HEADER + 3 * _full_record("AES-GCM") + 5] ^= 1
    reader = DecryptingReader(io.BytesIO(bytes(blob)), bytes(16), workers=2)
    assert reader.read(3 * CHUNK) == data[: 3 * CHUNK]
    for _ in range(2):
        with pytest.raises(DecryptionError, match="chunk 3 failed authentication"):
            reader.read(1)


# -- writer lifecycle ----------------------------------------------------------


def test_writer_lifecycle_flush_close_keeps_raw_open(tmp_path: Path) -> None:
    """flush() writes sealed chunks, close() adds the final one; raw stays open."""
    with open(tmp_path / "f.enc", "wb") as raw:
        writer = EncryptingWriter(raw, bytes(16), "AES-GCM", chunk_size=16, workers=2)
        assert writer.writable()
        assert not writer.readable()
        assert not writer.seekable()
        writer.write(b"a" * 40)
        writer.flush()
        assert raw.tell() == HEADER + 2 * (16 + 16)
        writer.close()
        writer.close()
        assert writer.closed
        assert not raw.closed
        with pytest.raises(ValueError, match="finished"):
            writer.write(b"x")
    assert _decrypt((tmp_path / "f.enc").read_bytes(), bytes(16)) == b"a" * 40


def test_exception_in_with_block_leaves_no_final_chunk() -> None:
    """Leaving the with-block by an exception abandons the stream: it never decrypts."""
    out = io.BytesIO()

    def save() -> None:
        with EncryptingWriter(out, bytes(16), "AES-CBC", chunk_size=16) as writer:
            writer.write(b"z" * 100)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        save()
    assert "final chunk is missing" in str(_fails(out.getvalue()))


def test_failed_raw_write_poisons_the_writer() -> None:
    """After raw.write fails, later calls raise and no final chunk is ever written."""

    class Failing(io.BytesIO):
        def write(self, b: Any) -> int:
            if self.tell() > 200:
                raise OSError(28, "No space left on device")
            return super().write(b)

    raw = Failing()
    writer = EncryptingWriter(raw, bytes(16), "AES-GCM", chunk_size=32, workers=2)
    with pytest.raises(OSError, match="No space"):
        writer.write(bytes(1000))
    with pytest.raises(ValueError, match="failed earlier.*No space") as info:
        writer.finish()
    assert isinstance(info.value.__cause__, OSError)
    writer.close()
    _fails(raw.getvalue())


# -- threads and memory --------------------------------------------------------


@pytest.mark.parametrize("mode", list(KEY_SIZES))
def test_parallel_output_equals_single_thread_output(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the same randomness, 3 workers (copied or borrowed chunks) write 1 worker's bytes."""
    data = _data(37 * CHUNK + 11)
    outputs = []
    for workers, odd in [(1, False), (3, True), (3, False)]:
        monkeypatch.setattr(crypto_header, "random_bytes", random.Random(0).randbytes)
        outputs.append(_encrypt(data, bytes(16), mode, workers=workers, odd=odd))
    assert outputs[0] == outputs[1] == outputs[2]
    assert _decrypt(outputs[1], bytes(16), workers=3) == data


class _BufferSpy:
    """Wraps a ChunkCipher; counts seals that read the caller's buffer, and late ones."""

    def __init__(self, inner: Any, caller: bytearray) -> None:
        self._inner, self._caller = inner, caller
        self.returned = False
        self.borrowed = self.late = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def seal(self, index: int, final: bool, src: memoryview, *rest: Any) -> Any:
        if src.obj is self._caller:
            self.borrowed += 1
            self.late += self.returned
        return self._inner.seal(index, final, src, *rest)


@pytest.mark.parametrize(
    ("workers", "chunks", "borrows"),
    [(1, 10, True), (3, 10, True), (3, 2, False), (4, 3, False)],
)
def test_caller_buffer_is_free_once_write_returns(workers: int, chunks: int, borrows: bool) -> None:
    """Large writes seal from the caller's buffer (no copy), small ones copy; none read it later."""
    data = _data(chunks * CHUNK + 5)
    caller = bytearray(data)
    out = io.BytesIO()
    writer = EncryptingWriter(out, bytes(16), "AES-CBC", chunk_size=CHUNK, workers=workers)
    spy = writer._cipher = _BufferSpy(writer._cipher, caller)
    writer.write(caller)
    spy.returned = True
    caller[:] = bytes(len(caller))
    writer.close()
    assert (spy.borrowed == chunks) if borrows else (spy.borrowed == 0)
    assert spy.late == 0
    assert _decrypt(out.getvalue(), bytes(16)) == data


class _Rendezvous:
    """Wraps a ChunkCipher: the first two calls wait for each other (needs two threads)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._barrier = threading.Barrier(2, timeout=10)
        self._calls = 0
        self._lock = threading.Lock()
        self.threads: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _meet(self) -> None:
        with self._lock:
            self._calls += 1
            first_two = self._calls <= 2
            self.threads.add(threading.current_thread().name)
        if first_two:
            self._barrier.wait()

    def seal(self, *args: Any) -> Any:
        self._meet()
        return self._inner.seal(*args)

    def open(self, *args: Any) -> Any:
        self._meet()
        return self._inner.open(*args)


@pytest.mark.parametrize("mode", ["AES-CBC", "SM4-CBC"])
def test_cbc_chunks_are_sealed_and_opened_on_several_threads(mode: str) -> None:
    """Two chunks are in the cipher at the same time, on torchaux-crypto threads."""
    data = _data(20 * CHUNK)
    out = io.BytesIO()
    writer = EncryptingWriter(out, bytes(16), mode, chunk_size=CHUNK, workers=2)
    spy = writer._cipher = _Rendezvous(writer._cipher)
    writer.write(data)
    writer.close()
    assert len(spy.threads) == 2
    assert all(t.startswith("torchaux-crypto") for t in spy.threads)
    reader = DecryptingReader(io.BytesIO(out.getvalue()), bytes(16), workers=2)
    spy = reader._cipher = _Rendezvous(reader._cipher)
    assert reader.read() == data
    assert len(spy.threads) == 2
    assert all(t.startswith("torchaux-crypto") for t in spy.threads)


def _bound(workers: int, chunk: int) -> int:
    """Documented bound: 2 x workers chunks in flight, each a plaintext copy and a record."""
    return (4 * workers + 3) * chunk


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("odd", [False, True], ids=["one-write", "many-writes"])
def test_streaming_memory_is_bounded(mode: str, workers: int, odd: bool) -> None:
    """Encrypting 64 MiB allocates a few chunks per worker, not the file (tracemalloc peak)."""
    chunk, total = 256 << 10, 64 << 20
    data = memoryview(bytes(total))
    pieces = [data[i : i + 1000003] for i in range(0, total, 1000003)] if odd else [data]
    sink = _Sink()
    tracemalloc.start()
    try:
        writer = EncryptingWriter(sink, bytes(16), mode, chunk_size=chunk, workers=workers)
        for piece in pieces:
            writer.write(piece)
        writer.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.n == HEADER + (total // chunk) * _full_record(mode, chunk) + _full_record(mode, 0)
    assert peak < _bound(workers, chunk), f"peak {peak / chunk:.1f} chunks"


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_decrypting_memory_is_bounded(tmp_path: Path, workers: int) -> None:
    """Decrypting 64 MiB from a file allocates a few chunks per worker (tracemalloc peak)."""
    chunk, total = 256 << 10, 64 << 20
    path = tmp_path / "big.enc"
    with open(path, "wb") as raw:
        writer = EncryptingWriter(raw, bytes(16), "AES-CBC", chunk_size=chunk)
        writer.write(bytes(total))
        writer.close()
    sink = _Sink()
    with open(path, "rb") as raw:
        tracemalloc.start()
        try:
            n = decrypt_stream(raw, sink, bytes(16), workers=workers)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert n == sink.n == total
    assert peak < _bound(workers, chunk), f"peak {peak / chunk:.1f} chunks"


def test_stable_buffers_round_trip_and_return_before_sealing() -> None:
    """With stable_buffers, write() returns before whole chunks are sealed and output still decrypts."""
    import threading

    from torchaux.checkpoint.crypto import chunks as crypto_chunks

    data = bytes(range(256)) * 4096  # 1 MiB = 16 chunks of 64 KiB
    gate = threading.Event()
    sealed: list[int] = []
    real_seal = crypto_chunks._CbcHmacCipher.seal

    def slow_seal(self, index, *args, **kwargs):  # type: ignore[no-untyped-def]
        gate.wait(30)
        sealed.append(index)
        return real_seal(self, index, *args, **kwargs)

    buf = io.BytesIO()
    crypto_chunks._CbcHmacCipher.seal = slow_seal  # type: ignore[method-assign]
    try:
        w = EncryptingWriter(buf, bytes(32), "AES-CBC", chunk_size=64 << 10, workers=2,
                             stable_buffers=True)
        w.write(memoryview(data)[: 2 * (64 << 10)])  # two whole chunks: must not block
        assert sealed == []
        gate.set()
        w.write(memoryview(data)[2 * (64 << 10):])
        w.close()
        assert sorted(sealed) == list(range(17))  # 16 whole chunks + the empty final one
    finally:
        crypto_chunks._CbcHmacCipher.seal = real_seal  # type: ignore[method-assign]
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(buf.getvalue()), out, bytes(32))
    assert out.getvalue() == data


# -- sealing straight into a DirectFile's buffer -------------------------------


@pytest.mark.parametrize("mode", list(KEY_SIZES))
@pytest.mark.parametrize("chunk", [4096, 16 << 10])
def test_in_place_sealing_into_direct_file(tmp_path: Path, mode: str, chunk: int) -> None:
    """One worker seals into DirectFile.reserve()d memory; records too big for a buffer go aside."""
    from torchaux.checkpoint.storage.direct_io import DirectFile, enable_direct_io

    data, key = _data(10 * chunk + 333), _key(16)
    path = tmp_path / "enc.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        enable_direct_io(fd)
        raw = DirectFile(fd, buffer_bytes=8192)  # 16 KiB chunks do not fit: the fallback
        reserved: list[int] = []
        real = raw.reserve
        raw.reserve = lambda n: (reserved.append(n), real(n))[1]  # type: ignore[method-assign]
        with EncryptingWriter(raw, key, mode, chunk_size=chunk, workers=1) as writer:
            for piece in _odd_pieces(data):
                writer.write(piece)
        raw.finish()
    finally:
        os.close(fd)
    assert len(reserved) == 11  # every chunk went through reserve, the final one too
    assert _decrypt(path.read_bytes(), key, mode) == data
