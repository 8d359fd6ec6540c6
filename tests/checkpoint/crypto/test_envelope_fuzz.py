"""Seeded fuzzing of the encrypted stream: garbage and mutations never decrypt, round trips do."""

from __future__ import annotations

import io
import random

import pytest

pytest.importorskip("cryptography")

from torchaux.checkpoint.crypto.envelope import (  # noqa: E402
    KEY_SIZES,
    DecryptingReader,
    EncryptingWriter,
    decrypt_stream,
)
from torchaux.checkpoint.crypto.header import MAGIC  # noqa: E402
from torchaux.errors import IntegrityError  # noqa: E402

pytestmark = pytest.mark.timeout(120)

KEYS = [(mode, size) for mode, sizes in KEY_SIZES.items() for size in sizes]
HEADER = 92
CASES = 300


def _encrypt(rng: random.Random, data: bytes, key: bytes, mode: str, chunk: int) -> bytes:
    out = io.BytesIO()
    with EncryptingWriter(out, key, mode, chunk_size=chunk, workers=rng.randint(1, 3)) as writer:
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, len(data)])
            writer.write(memoryview(data)[pos : pos + step])
            pos += step
    return out.getvalue()


def _rejects(rng: random.Random, blob: bytes, key: bytes) -> None:
    """Decrypting ``blob`` raises IntegrityError (or its DecryptionError subclass), nothing else."""
    out = io.BytesIO()
    with pytest.raises(IntegrityError):
        decrypt_stream(io.BytesIO(blob), out, key, workers=rng.randint(1, 3))


def _valid_file(rng: random.Random) -> tuple[bytes, bytes, bytes, str]:
    mode, size = rng.choice(KEYS)
    key = rng.randbytes(size)
    data = rng.randbytes(rng.randint(0, 400))
    return _encrypt(rng, data, key, mode, rng.choice([16, 32, 48, 64])), key, data, mode


def test_random_garbage_is_rejected() -> None:
    """Random byte strings of random lengths raise IntegrityError, never another error."""
    rng = random.Random(101)
    for _ in range(CASES):
        _rejects(rng, rng.randbytes(rng.randint(0, 600)), rng.randbytes(rng.choice([16, 24, 32])))


def test_garbage_after_a_valid_magic_is_rejected() -> None:
    """The magic followed by random bytes (a plausible length field too) is rejected."""
    rng = random.Random(102)
    for case in range(CASES):
        tail = rng.randbytes(rng.randint(0, 400))
        if case % 2:
            tail = b"\x00\x01\x00\x5c" + tail  # version 1, header length 92
        _rejects(rng, MAGIC + tail, rng.randbytes(16))


def test_garbage_after_a_valid_header_is_rejected() -> None:
    """A genuine header (right key) followed by random records is rejected."""
    rng = random.Random(103)
    for _ in range(CASES):
        blob, key, _, _ = _valid_file(rng)
        _rejects(rng, blob[:HEADER] + rng.randbytes(rng.randint(0, 500)), key)


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    kind = rng.randrange(5)
    if kind == 0:  # overwrite a few random bytes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # delete a random range
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 80)]
    elif kind == 2:  # insert random bytes
        start = rng.randint(0, len(data))
        data[start:start] = rng.randbytes(rng.randint(1, 80))
    elif kind == 3:  # duplicate a random range in place
        start = rng.randrange(len(data))
        piece = data[start : start + rng.randint(1, 120)]
        data[start:start] = piece
    else:  # cut at a random point, maybe append a copy of the tail
        cut = rng.randrange(len(data))
        data = data[:cut] + (data[cut - 40 : cut] if rng.random() < 0.5 else b"")
    return bytes(data)


def test_random_mutations_of_valid_files_are_rejected() -> None:
    """Overwrites, deletions, insertions, duplications and cuts of real files never decrypt."""
    rng = random.Random(104)
    done = 0
    while done < CASES:
        blob, key, _, _ = _valid_file(rng)
        mutated = _mutate(rng, blob)
        if mutated == blob:
            continue
        _rejects(rng, mutated, key)
        done += 1


def test_random_round_trips() -> None:
    """Random modes, keys, chunk sizes, write and read patterns and workers round-trip."""
    rng = random.Random(105)
    for _ in range(CASES // 2):
        mode, size = rng.choice(KEYS)
        key, data = rng.randbytes(size), rng.randbytes(rng.randint(0, 3000))
        chunk = 16 * rng.randint(1, 40)
        blob = _encrypt(rng, data, key, mode, chunk)
        reader = DecryptingReader(io.BytesIO(blob), key, mode=mode, workers=rng.randint(1, 4))
        parts = []
        while part := reader.read(rng.choice([1, 5, chunk, 2 * chunk + 3])):
            parts.append(part)
        assert b"".join(parts) == data
