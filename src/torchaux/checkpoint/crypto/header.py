"""The header of an encrypted checkpoint: modes, key checks, key derivation.

:mod:`torchaux.checkpoint.crypto.envelope` documents the byte layout and owns the
streams; this module builds and parses the header, derives the per-file keys
and checks a key against a header.  ``cryptography`` is imported on first use,
so validating a key or describing a header works without the ``encryption``
extra.
"""

from __future__ import annotations

import hmac
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from torchaux.errors import DecryptionError, IntegrityError, UnsupportedFormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "IDENTITY_VERSION",
    "VERSIONS",
    "HEADER_SIZE",
    "MAX_IDENTITY_BYTES",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MODES",
    "ModeSpec",
    "Header",
    "validate_key",
    "derive_key",
    "new_header",
    "read_header",
    "check_key",
    "check_identity",
    "check_expected_identity",
    "random_bytes",
    "require_cryptography",
]

MAGIC = b"\x89TAUXE\r\n"
#: Version of a header without an identity (byte-identical to torchaux 0.1.0's).
FORMAT_VERSION = 1
#: Version of a header carrying a checkpoint identity (``enc_aad``) before its CRC.
IDENTITY_VERSION = 2
#: Versions this torchaux reads.
VERSIONS = (FORMAT_VERSION, IDENTITY_VERSION)
#: Length of a version-1 header; a version-2 header is 94 + identity length.
HEADER_SIZE = 92
#: Longest identity (UTF-8 bytes) a header may carry: a name and a step, not a payload.
MAX_IDENTITY_BYTES = 1024
_ID_LEN = struct.Struct(">H")
# Chunk sizes are whole cipher blocks, so a full CBC chunk pads to exactly one
# extra block and every final chunk (always shorter than a full one) has a
# strictly shorter record: record length alone tells the reader which is last.
MIN_CHUNK_SIZE = 16
# Readers allocate chunk-sized buffers before the first chunk is verified.
MAX_CHUNK_SIZE = 1 << 30
_BLOCK = 16
_MAC = 32
# magic, version, header length | mode, key length, kdf, reserved, chunk size, salt, nonce prefix
_PREFIX = struct.Struct(">8sHH")
_FIELDS = struct.Struct(">8sHHBBBBI32s4s")
_CRC_AT = _FIELDS.size  # 56: CRC-32 of bytes [0, 56)
_MAC_AT = _CRC_AT + 4  # 60: HMAC-SHA256 of bytes [0, 60)
# A header longer than this is corrupt in any version (guards the allocation).
_MAX_HEADER = 4096
_KDF_HKDF_SHA256 = 1
_INFO = b"torchaux-encryption/v1/"

#: Source of salts, nonce prefixes and CBC IVs.  Tests replace it with a seeded
#: generator to compare outputs byte for byte; nothing else should.
random_bytes: Callable[[int], bytes] = os.urandom


@dataclass(frozen=True)
class ModeSpec:
    """One encryption mode: its name, header id, key sizes and construction."""

    name: str
    id: int
    key_sizes: tuple[int, ...]
    algorithm: str  # attribute of cryptography's ``algorithms`` module
    aead: bool


MODES: dict[str, ModeSpec] = {
    m.name: m
    for m in (
        ModeSpec("AES-GCM", 1, (16, 24, 32), "AES", True),
        ModeSpec("AES-CBC", 2, (16, 24, 32), "AES", False),
        ModeSpec("SM4-CBC", 3, (16,), "SM4", False),
    )
}
_BY_ID = {m.id: m for m in MODES.values()}


def validate_key(key: object, mode: object) -> ModeSpec:
    """Check ``key`` and ``mode`` without I/O; return the mode's spec (see crypto.validate_key)."""
    if not isinstance(mode, str):
        raise TypeError(
            f"encryption mode must be a str, one of {sorted(MODES)}; got {type(mode).__name__}"
        )
    spec = MODES.get(mode)
    if spec is None:
        raise ValueError(f"unknown encryption mode {mode!r}; use one of {sorted(MODES)}")
    if not isinstance(key, bytes):
        raise TypeError(
            f"encryption key must be bytes of length {_lengths(spec)}; got {type(key).__name__} "
            "(convert with bytes(key))"
        )
    if len(key) not in spec.key_sizes:
        raise ValueError(
            f"{mode} needs a key of {_lengths(spec)} bytes; got {len(key)} bytes "
            "(generate one with secrets.token_bytes(32), or 16 for SM4-CBC)"
        )
    return spec


def _lengths(spec: ModeSpec) -> str:
    return " or ".join(str(n) for n in spec.key_sizes)


def require_cryptography() -> Any:
    """The ``cryptography`` ciphers module, or an ImportError naming the extra to install."""
    try:
        from cryptography.hazmat.primitives.ciphers import algorithms
    except ImportError as exc:
        raise ImportError(
            "checkpoint encryption requires the 'cryptography' package: "
            "pip install torchaux[encryption]"
        ) from exc
    return algorithms


@dataclass(frozen=True)
class Header:
    """A parsed header; ``raw`` is its exact on-disk bytes (MAC included)."""

    version: int
    mode: ModeSpec
    key_size: int
    chunk_size: int
    salt: bytes
    nonce_prefix: bytes
    raw: bytes
    #: The checkpoint identity of a version-2 header (authenticated, not secret); None in v1.
    identity: bytes | None = None

    def describe(self) -> dict[str, Any]:
        """The fields a user may want to see (nothing secret)."""
        identity = None
        if self.identity is not None:
            try:
                identity = self.identity.decode("utf-8")
            except UnicodeDecodeError:
                identity = "hex:" + self.identity.hex()
        return {
            "format": "torchaux-encrypted",
            "version": self.version,
            "mode": self.mode.name,
            "key_bits": self.key_size * 8,
            "kdf": "HKDF-SHA256",
            "chunk_size": self.chunk_size,
            "header_size": len(self.raw),
            "identity": identity,
        }


def check_identity(value: object, name: str = "enc_aad") -> bytes:
    """A checkpoint identity as bytes: a non-empty ``str`` (UTF-8) or ``bytes`` of at most 1024.

    >>> check_identity("run7/step1200")
    b'run7/step1200'
    """
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name} must be valid Unicode (it has a lone surrogate)") from None
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be a str or bytes, e.g. 'run7/step1200'; got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_IDENTITY_BYTES:
        raise ValueError(
            f"{name} must be 1 to {MAX_IDENTITY_BYTES} bytes (a name and step, not data); "
            f"got {len(value)} bytes"
        )
    return value


def check_expected_identity(header: Header, expected: bytes) -> None:
    """Refuse a file whose authenticated identity is not ``expected`` (call after :func:`check_key`)."""
    if header.identity == expected:
        return
    found = "no identity (saved without enc_aad)" if header.identity is None else (
        f"identity {header.identity[:80]!r}"
    )
    raise DecryptionError(
        f"the file is not the expected checkpoint: it carries {found}, expected "
        f"{expected[:80]!r}; it was swapped, rolled back or saved under another identity"
    )


def derive_key(key: bytes, header: Header | bytes, purpose: bytes, n: int) -> bytes:
    """HKDF-SHA256 of the user key: salt from the header, info naming mode and purpose."""
    require_cryptography()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    raw = header.raw if isinstance(header, Header) else header
    mode = _BY_ID[raw[12]]
    info = _INFO + mode.name.encode() + b"/" + purpose
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=raw[20:52], info=info).derive(key)


def new_header(key: bytes, mode: str, chunk_size: int, identity: bytes | None = None) -> Header:
    """A fresh header for ``key``: random salt and nonce prefix, CRC and HMAC filled in.

    With ``identity`` the header is version 2: the identity (length-prefixed)
    sits before the CRC, so the HMAC authenticates it and every chunk, bound
    to the SHA-256 of the whole header, is bound to it too.
    """
    spec = validate_key(key, mode)
    if identity is not None:
        identity = check_identity(identity)
    prefix = random_bytes(4) if spec.aead else bytes(4)
    extra = b"" if identity is None else _ID_LEN.pack(len(identity)) + identity
    fields = _FIELDS.pack(
        MAGIC,
        FORMAT_VERSION if identity is None else IDENTITY_VERSION,
        HEADER_SIZE + len(extra),
        spec.id,
        len(key),
        _KDF_HKDF_SHA256,
        0,
        chunk_size,
        random_bytes(32),
        prefix,
    ) + extra
    signed = fields + struct.pack(">I", zlib.crc32(fields))
    mac_key = derive_key(key, signed, b"header-mac", _MAC)
    return _parse(signed + hmac.digest(mac_key, signed, "sha256"))


def _read_exact(raw: IO[bytes], n: int) -> bytes:
    parts = []
    while n > 0:
        data = raw.read(n)
        if not data:
            break
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def read_header(raw: IO[bytes]) -> Header:
    """Read and check a header without the key: magic, length, CRC-32, field values."""
    first = _read_exact(raw, _PREFIX.size)
    if not first or first[:8] != MAGIC[: len(first)]:
        raise IntegrityError(_bad_magic(first))
    if len(first) < _PREFIX.size:
        raise IntegrityError(_short_header(_PREFIX.size, len(first)))
    _, _, size = _PREFIX.unpack(first)
    if not _MAC_AT + _MAC <= size <= _MAX_HEADER:
        raise IntegrityError(
            f"encrypted checkpoint header claims {size} bytes; expected {HEADER_SIZE} "
            "(between 92 and 4096 in any version): the header is corrupt, restore the file"
        )
    rest = _read_exact(raw, size - _PREFIX.size)
    if len(rest) < size - _PREFIX.size:
        raise IntegrityError(_short_header(size, _PREFIX.size + len(rest)))
    return _parse(first + rest)


def _bad_magic(found: bytes) -> str:
    if found.startswith(b"PK\x03\x04"):
        return (
            "this checkpoint is not encrypted (it is a plain torch.save zip, found 'PK\\x03\\x04' "
            "where the encrypted-checkpoint magic belongs); load it without a key"
        )
    return (
        f"not an encrypted torchaux checkpoint: expected magic {MAGIC.hex(' ')}, "
        f"found {found.hex(' ') or 'an empty file'}; the file is corrupt or of another format"
    )


def _short_header(expected: int, found: int) -> str:
    return (
        f"encrypted checkpoint is truncated inside its header: expected {expected} header bytes, "
        f"found {found}; the file is incomplete, restore it from a good copy"
    )


def _parse(raw: bytes) -> Header:
    # The last 36 bytes of every version's header are CRC-32 and HMAC, so a
    # corrupt header is told apart from a newer version without the key.
    body = raw[: len(raw) - _MAC - 4]
    (crc,) = struct.unpack_from(">I", raw, len(body))
    if zlib.crc32(body) != crc:
        raise IntegrityError(
            f"encrypted checkpoint header is corrupt: CRC-32 {zlib.crc32(body):#010x} does not "
            f"match the stored {crc:#010x}; the file was damaged, restore it from a good copy"
        )
    _, version, size, mode_id, key_size, kdf, reserved, chunk, salt, prefix = _FIELDS.unpack_from(
        raw
    )
    if version not in VERSIONS:
        raise UnsupportedFormatError(
            f"encrypted checkpoint format version {version} is not supported: this torchaux "
            f"reads versions {VERSIONS}; upgrade torchaux to load it"
        )
    spec = _BY_ID.get(mode_id)
    if spec is None or kdf != _KDF_HKDF_SHA256:
        raise UnsupportedFormatError(
            f"encrypted checkpoint uses mode id {mode_id} / KDF id {kdf}; this torchaux knows "
            f"modes {sorted((m.id, m.name) for m in MODES.values())} and KDF 1 (HKDF-SHA256); "
            "upgrade torchaux to load it"
        )
    problems = []
    identity = None
    if version == IDENTITY_VERSION:
        # body is [0, size - 36): the v1 fields, then uint16 L and L identity bytes.
        n = _ID_LEN.unpack_from(raw, _CRC_AT)[0] if len(body) >= _CRC_AT + 2 else -1
        if not 1 <= n <= MAX_IDENTITY_BYTES or size != HEADER_SIZE + 2 + n:
            problems.append(f"identity length {n} in a {size}-byte header")
        else:
            identity = bytes(raw[_CRC_AT + 2 : _CRC_AT + 2 + n])
    elif size != HEADER_SIZE:
        problems.append(f"header length {size} (expected {HEADER_SIZE})")
    if key_size not in spec.key_sizes:
        problems.append(f"key length {key_size} (expected {_lengths(spec)} for {spec.name})")
    if reserved != 0 or (not spec.aead and prefix != bytes(4)):
        problems.append("non-zero reserved bytes")
    if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE or chunk % _BLOCK:
        problems.append(f"chunk size {chunk} (expected a multiple of 16 in 16..2**30)")
    if problems:
        raise IntegrityError(
            "encrypted checkpoint header is malformed: "
            + "; ".join(problems)
            + "; the file was not written by this torchaux version or is corrupt"
        )
    return Header(version, spec, key_size, chunk, salt, prefix, raw, identity)


def check_key(key: bytes, header: Header, mode: str | None) -> None:
    """Check ``key`` (and the requested ``mode``) against ``header``'s HMAC."""
    if mode is not None and mode != header.mode.name:
        raise DecryptionError(
            f"the file is encrypted with {header.mode.name}, but {mode} was requested; "
            f"pass mode={header.mode.name!r} (or mode=None to use the file's mode)"
        )
    if len(key) != header.key_size:
        raise DecryptionError(
            f"wrong key: the file was encrypted with a {header.key_size}-byte "
            f"{header.mode.name} key, got a {len(key)}-byte key; pass the key used to save it"
        )
    signed = header.raw[: len(header.raw) - _MAC]
    mac_key = derive_key(key, header, b"header-mac", _MAC)
    if not hmac.compare_digest(hmac.digest(mac_key, signed, "sha256"), header.raw[len(signed):]):
        raise DecryptionError(
            f"wrong key: the header's HMAC does not verify under the given "
            f"{header.key_size * 8}-bit {header.mode.name} key (or the header was tampered "
            "with); pass the key used to save this checkpoint"
        )
