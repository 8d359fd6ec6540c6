"""Damaged checkpoints: every format x encryption x crc_check, table-driven.

The rule for every damaged file: load_checkpoint raises
:class:`~torchaux.IntegrityError` (:class:`~torchaux.DecryptionError` for key
and mode problems), never another exception type, or it returns exactly the
saved values.  Only a plaintext file saved without a CRC may load changed
values: nothing in it can tell.  Files are saved once per configuration
under fixed names, so the positions hit are the same in every run.
"""

from __future__ import annotations

import random
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from secure_helpers import (
    APPEND_SCALARS,
    ENCRYPTIONS,
    FORMATS,
    entries_mismatch,
    expected_entries,
    sample_state,
)

import torchaux
from torchaux import DecryptionError, IntegrityError, _knobs
from torchaux.checkpoint.crypto.header import MAGIC

EXPECTED = expected_entries(sample_state(), APPEND_SCALARS)


@dataclass(frozen=True)
class Config:
    """One way of saving: format, encryption and crc_check."""

    fmt: str
    enc_id: str
    key: bytes | None
    mode: str
    crc: bool

    @property
    def id(self) -> str:
        return f"{self.fmt}-{self.enc_id}-{'crc' if self.crc else 'nocrc'}"

    @property
    def protected(self) -> bool:
        """Whether any change to the file must be detected (encrypted or CRC)."""
        return self.key is not None or self.crc


CONFIGS = [
    Config(fmt, enc_id, key, mode, crc)
    for fmt in FORMATS
    for enc_id, key, mode in ENCRYPTIONS
    for crc in (False, True)
]

def _params(marks: dict[str, pytest.MarkDecorator] | None = None) -> list[Any]:
    marks = marks or {}
    return [pytest.param(c, id=c.id, marks=marks.get(c.id, ())) for c in CONFIGS]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Config], bytes]:
    """The saved bytes of a configuration (saved once per module, under a fixed name)."""
    cache: dict[Config, bytes] = {}

    def get(cfg: Config) -> bytes:
        if cfg not in cache:
            path = tmp_path_factory.mktemp(cfg.id) / "model.ckpt"
            torchaux.save_checkpoint(
                sample_state(), path, append_dict=dict(APPEND_SCALARS), enc_key=cfg.key,
                enc_mode=cfg.mode, crc_check=cfg.crc, format=cfg.fmt,
            )
            cache[cfg] = path.read_bytes()
        return cache[cfg]

    return get


def _violation(path: str, cfg: Config, data: bytes, **overrides: Any) -> str | None:
    """None if loading ``data`` obeys the rule, else what went wrong."""
    with open(path, "wb") as f:
        f.write(data)
    kwargs: dict[str, Any] = {"dec_key": cfg.key, "dec_mode": cfg.mode, "crc_check": cfg.crc}
    kwargs.update(overrides)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no CRC recorded" when the damage hit the CRC record
            loaded = torchaux.load_checkpoint(path, **kwargs)
    except IntegrityError:
        return None
    except Exception as exc:  # noqa: BLE001 - any other type is the failure being looked for
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    problem = entries_mismatch(loaded, EXPECTED)
    if problem is None or not cfg.protected:
        return None
    return f"loaded changed data without an error ({problem})"


def _assert_all_fine(results: list[str]) -> None:
    assert not results, f"{len(results)} violation(s):\n" + "\n".join(results[:25])


def _flips(n: int) -> Iterator[tuple[int, int]]:
    """(position, xor mask): the header bytes, the middle, the end, and a spread in between."""
    positions = sorted(
        set(range(0, min(n, 128), 2))
        | set(range(max(0, n // 2 - 16), min(n, n // 2 + 16), 4))
        | set(range(max(0, n - 64), n, 2))
        | set(range(0, n, max(1, n // 48)))
    )
    masks = (0x01, 0x80, 0xFF, 0x20)
    for i, pos in enumerate(positions):
        yield pos, masks[i % len(masks)]


@pytest.mark.parametrize(
    "cfg",
    _params(),
)
def test_flipped_byte(tmp_path: Any, original: Callable[[Config], bytes], cfg: Config) -> None:
    """A byte flipped anywhere (header, middle, end) raises IntegrityError or changes nothing."""
    data = original(cfg)
    bad = []
    for pos, mask in _flips(len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= mask
        problem = _violation(str(tmp_path / "x"), cfg, bytes(damaged))
        if problem:
            bad.append(f"byte {pos} ^ {mask:#04x}: {problem}")
    _assert_all_fine(bad)


@pytest.mark.parametrize("cfg", _params({}))
def test_truncated(tmp_path: Any, original: Callable[[Config], bytes], cfg: Config) -> None:
    """A file cut anywhere raises IntegrityError (a cut file never loads)."""
    data = original(cfg)
    n = len(data)
    cuts = {1, 4, 7, 8, 9, 12, 16, 17, 56, 60, 64, 91, 92, 93, 100,
            n // 4, n // 2, 3 * n // 4, n - 80, n - 64, n - 33, n - 32, n - 22, n - 17, n - 16,
            n - 2, n - 1}
    bad = []
    for cut in sorted(c for c in cuts if 0 < c < n):
        with open(tmp_path / "x", "wb") as f:
            f.write(data[:cut])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torchaux.load_checkpoint(tmp_path / "x", dec_key=cfg.key, dec_mode=cfg.mode,
                                         crc_check=cfg.crc)
        except IntegrityError:
            continue
        except Exception as exc:  # noqa: BLE001 - reported below
            bad.append(f"cut at {cut}: {type(exc).__name__}: {exc}")
        else:
            bad.append(f"cut at {cut}: loaded")
    _assert_all_fine(bad)


@pytest.mark.parametrize("cfg", _params())
def test_appended_bytes(tmp_path: Any, original: Callable[[Config], bytes], cfg: Config) -> None:
    """Bytes appended to an encrypted or CRC file raise IntegrityError; plain ones load as saved."""
    data = original(cfg)
    bad = []
    extras = (b"\0", b"111", bytes(17), b"crc_num" + bytes(10), b"PK\x05\x06" + bytes(18), data)
    for extra in extras:
        with open(tmp_path / "x", "wb") as f:
            f.write(data + extra)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = torchaux.load_checkpoint(tmp_path / "x", dec_key=cfg.key,
                                                  dec_mode=cfg.mode, crc_check=cfg.crc)
        except IntegrityError:
            continue
        except Exception as exc:  # noqa: BLE001 - reported below
            bad.append(f"+{extra[:8]!r}: {type(exc).__name__}: {exc}")
            continue
        if cfg.protected:
            bad.append(f"+{extra[:8]!r}: loaded although the file has extra bytes")
        elif (problem := entries_mismatch(loaded, EXPECTED)) is not None:
            bad.append(f"+{extra[:8]!r}: {problem}")
    _assert_all_fine(bad)


def _garbage(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)

    def noise(k: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(k))

    header = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,'
    return [
        ("random", noise(n)),
        ("zip magic", b"PK\x03\x04" + noise(n)),
        ("empty zip", b"PK\x05\x06" + bytes(18)),
        ("encryption magic", MAGIC + noise(n)),
        ("encryption header", MAGIC + b"\x00\x01\x00\x5c\x01\x10\x01\x00" + noise(n)),
        ("safetensors-like", (200).to_bytes(8, "little") + header + noise(n)),
        ("zeros", bytes(n)),
        ("text", b"not a checkpoint\n" * 8),
    ]


@pytest.mark.parametrize("cfg", _params({}))
def test_garbage(tmp_path: Any, cfg: Config) -> None:
    """A file replaced by garbage (random, or behind a real magic number) raises IntegrityError."""
    bad = []
    for name, data in _garbage(512, zlib.crc32(cfg.id.encode())):
        with open(tmp_path / "x", "wb") as f:
            f.write(data)
        try:
            torchaux.load_checkpoint(tmp_path / "x", dec_key=cfg.key, dec_mode=cfg.mode,
                                     crc_check=cfg.crc)
        except IntegrityError:
            continue
        except Exception as exc:  # noqa: BLE001 - reported below
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            bad.append(f"{name}: loaded")
    _assert_all_fine(bad)


@pytest.mark.parametrize("cfg", _params({}))
def test_empty_file(tmp_path: Any, cfg: Config) -> None:
    """An empty file raises ValueError saying it is empty."""
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        torchaux.load_checkpoint(tmp_path / "x", dec_key=cfg.key, dec_mode=cfg.mode,
                                 crc_check=cfg.crc)


_ENCRYPTED = [c for c in CONFIGS if c.key is not None]
_PLAIN = [c for c in CONFIGS if c.key is None]


@pytest.mark.parametrize("cfg", _ENCRYPTED, ids=[c.id for c in _ENCRYPTED])
def test_wrong_key_wrong_mode_no_key(
    tmp_path: Any, original: Callable[[Config], bytes], cfg: Config
) -> None:
    """Wrong key, wrong mode, or no key on an encrypted file raise DecryptionError."""
    assert cfg.key is not None
    path = tmp_path / "x"
    path.write_bytes(original(cfg))
    wrong_key = cfg.key[:-1] + bytes([cfg.key[-1] ^ 0x80])
    with pytest.raises(DecryptionError):
        torchaux.load_checkpoint(path, dec_key=wrong_key, dec_mode=cfg.mode, crc_check=cfg.crc)
    for mode in ("AES-GCM", "AES-CBC", "SM4-CBC"):
        if mode != cfg.mode and (mode != "SM4-CBC" or len(cfg.key) == 16):
            with pytest.raises(DecryptionError):
                torchaux.load_checkpoint(path, dec_key=cfg.key, dec_mode=mode)
    with pytest.raises(DecryptionError):
        torchaux.load_checkpoint(path, crc_check=cfg.crc)
    other_length = bytes(32 if len(cfg.key) != 32 else 16)
    with pytest.raises(DecryptionError):
        torchaux.load_checkpoint(path, dec_key=other_length, dec_mode="AES-GCM")


@pytest.mark.parametrize("cfg", _PLAIN, ids=[c.id for c in _PLAIN])
@pytest.mark.parametrize("enc", ENCRYPTIONS[1:], ids=[e[0] for e in ENCRYPTIONS[1:]])
def test_plaintext_refused_with_key(
    tmp_path: Any, original: Callable[[Config], bytes], cfg: Config, enc: tuple[str, bytes, str]
) -> None:
    """A plaintext file loaded with dec_key raises DecryptionError (it may have been swapped in)."""
    path = tmp_path / "x"
    path.write_bytes(original(cfg))
    with pytest.raises(DecryptionError, match="not encrypted"):
        torchaux.load_checkpoint(path, dec_key=enc[1], dec_mode=enc[2], crc_check=cfg.crc)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(9)
    i = rng.randrange(len(b))
    k = rng.randrange(1, 16)
    if kind == 0:
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b[i] = (b[i] + rng.randrange(1, 256)) % 256
    elif kind == 2:
        b[i:i + k] = bytes(rng.randrange(256) for _ in range(len(b[i:i + k])))
    elif kind == 3:
        del b[i:i + k]
    elif kind == 4:
        b[i:i] = bytes(rng.randrange(256) for _ in range(k))
    elif kind == 5:
        j = rng.randrange(len(b))
        b[i], b[j] = b[j], b[i]
    elif kind == 6:
        del b[i:]
    elif kind == 7:
        j = rng.randrange(len(b))
        b[j:j] = b[i:i + 64]
    else:
        b += bytes(rng.randrange(256) for _ in range(k))
    return bytes(b)


#: Mutations per configuration; 28 configurations, so 448 damaged files in all.
FUZZ_PER_CONFIG = 16


@pytest.mark.parametrize(
    "cfg",
    _params(),
)
def test_seeded_fuzz(tmp_path: Any, original: Callable[[Config], bytes], cfg: Config) -> None:
    """Random flips, overwrites, cuts, inserts, moves and appends obey the rule (seeded)."""
    data = original(cfg)
    rng = random.Random(zlib.crc32(cfg.id.encode()))
    bad = []
    for i in range(FUZZ_PER_CONFIG):
        damaged = _mutate(data, rng)
        if damaged == data:
            continue
        problem = _violation(str(tmp_path / "x"), cfg, damaged)
        if problem:
            bad.append(f"mutation {i}: {problem}")
    _assert_all_fine(bad)


# -- targeted cases: each a minimal repro -------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("enc", ENCRYPTIONS[1:], ids=[e[0] for e in ENCRYPTIONS[1:]])
def test_cut_at_chunk_boundary(tmp_path: Any, fmt: str, enc: tuple[str, bytes, str]) -> None:
    """A file of many small encrypted chunks cut at any chunk boundary raises IntegrityError."""
    _, key, mode = enc
    chunk = 64
    record = chunk + (16 if mode == "AES-GCM" else 64)
    path = tmp_path / "m"
    with _knobs.override(encryption_chunk_bytes=chunk):
        torchaux.save_checkpoint(sample_state(), path, append_dict=dict(APPEND_SCALARS),
                                 enc_key=key, enc_mode=mode, format=fmt)
    data = path.read_bytes()
    intact = torchaux.load_checkpoint(path, dec_key=key, dec_mode=mode)
    assert entries_mismatch(intact, EXPECTED) is None
    boundaries = range(92, len(data), record)
    assert len(boundaries) > 10, "the file should span many chunks"
    for cut in boundaries:
        path.write_bytes(data[:cut])
        with pytest.raises(IntegrityError):
            torchaux.load_checkpoint(path, dec_key=key, dec_mode=mode)


def _central_directory_offset(raw: bytes) -> int:
    # End of central directory record (no zip comment): offset of the CD at +16.
    assert raw[-22:-18] == b"PK\x05\x06"
    return int(struct.unpack_from("<I", raw, len(raw) - 22 + 16)[0])


@pytest.mark.parametrize(
    ("field", "offset", "value"),
    [("compression-method", 10, 99), ("encrypted-flag", 8, 1), ("version-needed", 6, 99)],
)
def test_damaged_central_directory_with_crc(
    tmp_path: Any, field: str, offset: int, value: int
) -> None:
    """A damaged central-directory field of a CRC .ckpt raises IntegrityError with crc_check."""
    path = tmp_path / "m.ckpt"
    torchaux.save_checkpoint({"w": torch.ones(3)}, path, crc_check=True)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, _central_directory_offset(bytes(raw)) + offset, value)
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(path, crc_check=True)


@pytest.mark.parametrize(
    ("old", "new"),
    [(b'"dtype":"F32"', b'"dtype":"I32"'), (b'\\"epoch\\": 7', b'\\"epoch\\": 8')],
    ids=["dtype-F32-to-I32", "epoch-7-to-8"],
)
def test_safetensors_crc_covers_header(tmp_path: Any, old: bytes, new: bytes) -> None:
    """A one-byte header change in a CRC safetensors file fails crc_check (IntegrityError)."""
    path = tmp_path / "m.safetensors"
    torchaux.save_checkpoint({"w": torch.ones(3)}, path, crc_check=True, format="safetensors",
                             append_dict={"epoch": 7})
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(path, crc_check=True)
