r"""Streaming, authenticated encryption of whole checkpoint files.

A checkpoint is encrypted as one stream: a small self-describing header, then
the plaintext cut into fixed-size chunks, each sealed separately and bound to
the header, its index and whether it is the last one.  Memory stays bounded
by a few chunks whatever the file size, chunks are sealed and opened in
parallel, and every mode is authenticated: a wrong key, a changed byte, a cut,
an appended byte or a moved chunk raises :class:`~torchaux.errors.DecryptionError`
or :class:`~torchaux.errors.IntegrityError` (both ``ValueError``), never wrong
plaintext.  This deliberately differs from MindSpore's encrypted checkpoints,
whose blocks carry no index or header and whose CBC modes have no MAC.

Byte layout, format version 1 (all integers unsigned big-endian; the file is
the header followed by one or more chunk records, nothing else):

Header, 92 bytes:

====== ==== ==================================================================
offset size field
====== ==== ==================================================================
0      8    magic ``89 54 41 55 58 45 0D 0A`` (``b"\x89TAUXE\r\n"``)
8      2    format version, 1
10     2    header length H, 92
12     1    mode: 1 AES-GCM, 2 AES-CBC, 3 SM4-CBC
13     1    key length in bytes: 16, 24 or 32 (SM4-CBC: 16)
14     1    key derivation: 1 HKDF-SHA256
15     1    reserved, 0
16     4    chunk size C, plaintext bytes per chunk: a multiple of 16 in [16, 2**30]
20     32   salt, random per file
52     4    nonce prefix, random per file (AES-GCM); 0 in the CBC modes
56     4    CRC-32 (zlib) of bytes [0, 56)
60     32   HMAC-SHA256 with key K_hdr of bytes [0, 60)
====== ==== ==================================================================

In every future version bytes [0, 12) keep their meaning and the header ends
with the CRC-32 of all bytes before it and a 32-byte MAC, so a reader tells a
damaged header (``IntegrityError``) from a newer version
(``UnsupportedFormatError``) without the key.

Keys: ``HKDF-SHA256(ikm=user key, salt=salt, info=b"torchaux-encryption/v1/"
+ ASCII mode name + b"/" + purpose)`` gives K_hdr (``header-mac``, 32 bytes), K_enc
(``cipher-key``, as long as the user key) and, in CBC modes, K_mac
(``mac-key``, 32 bytes).  A fresh salt per file makes every file's keys
unique, so GCM nonces never repeat under a key.

Chunks: chunk i (from 0) holds plaintext bytes [i*C, (i+1)*C).  Every chunk
but the last holds exactly C bytes; the last (final) chunk holds 0 <= n < C
bytes, so it is empty when the plaintext length is a multiple of C.  Each
chunk is bound to ``B_i = SHA-256(header bytes [0, H)) || uint64 i || uint8 f``
with f = 1 for the final chunk, else 0.  Records follow the header back to
back:

* AES-GCM: ``ciphertext (n bytes) || tag (16)``; key K_enc, 12-byte nonce
  ``nonce prefix || uint64 i``, associated data B_i.  A full record is C + 16
  bytes.
* AES-CBC, SM4-CBC: ``IV (16, random) || ciphertext (16 * (n // 16 + 1)) ||
  HMAC-SHA256(K_mac, B_i || IV || ciphertext) (32)``; the ciphertext is CBC
  with K_enc of the PKCS#7-padded chunk (encrypt-then-MAC).  A full record is
  C + 64 bytes.

A reader checks the header (magic, CRC-32, fields, then the HMAC, which
proves the key), then reads full-record-sized pieces: a full piece is a
non-final chunk, a shorter one (up to end of file) must be the final chunk,
and end of file where a record should start means the final chunk is
missing.  Each record's tag or MAC is verified before any of its plaintext is
released.
"""

from __future__ import annotations

import io  # noqa: F401 - used by the doctests
from typing import IO, Any

from torchaux.checkpoint.crypto import header as _header
from torchaux.checkpoint.crypto.header import MAGIC, MODES, read_header
from torchaux.checkpoint.crypto.reader import DecryptingReader, decrypt_stream
from torchaux.checkpoint.crypto.writer import DEFAULT_CHUNK_SIZE, EncryptingWriter

__all__ = [
    "KEY_SIZES",
    "DEFAULT_CHUNK_SIZE",
    "validate_key",
    "is_encrypted",
    "describe_header",
    "EncryptingWriter",
    "DecryptingReader",
    "decrypt_stream",
]


#: Accepted key lengths in bytes, by mode (the modes :func:`validate_key` accepts).
KEY_SIZES: dict[str, tuple[int, ...]] = {name: spec.key_sizes for name, spec in MODES.items()}


def validate_key(key: object, mode: object) -> None:
    """Check an encryption key and mode before any I/O.

    Args:
        key: the secret key, ``bytes`` of 16, 24 or 32 bytes (SM4-CBC: 16).
        mode: ``"AES-GCM"``, ``"AES-CBC"`` or ``"SM4-CBC"``.

    Raises:
        TypeError: ``key`` is not ``bytes`` or ``mode`` is not ``str``.
        ValueError: unknown mode, or a key length the mode does not accept.

    Example:
        >>> validate_key(bytes(32), "AES-GCM")
        >>> validate_key(bytes(32), "SM4-CBC")
        Traceback (most recent call last):
        ValueError: SM4-CBC needs a key of 16 bytes; got 32 bytes (...)
    """
    _header.validate_key(key, mode)


def is_encrypted(prefix: bytes) -> bool:
    r"""Whether a file starting with ``prefix`` (at least 8 bytes) is an encrypted checkpoint.

    Example:
        >>> is_encrypted(b"\x89TAUXE\r\n\x00\x01"), is_encrypted(b"PK\x03\x04")
        (True, False)
    """
    return bytes(prefix[: len(MAGIC)]) == MAGIC


def describe_header(raw: IO[bytes]) -> dict[str, Any]:
    """Read and check the header at ``raw``'s position, without the key.

    Returns:
        ``format``, ``version``, ``mode``, ``key_bits``, ``kdf``,
        ``chunk_size`` and ``header_size``.

    Raises:
        IntegrityError: not an encrypted checkpoint, or a damaged header.
        UnsupportedFormatError: written by a newer torchaux.

    Example:
        >>> buf = io.BytesIO()
        >>> with EncryptingWriter(buf, bytes(16), "SM4-CBC", chunk_size=1024) as w:
        ...     _ = w.write(b"data")
        >>> _ = buf.seek(0)
        >>> describe_header(buf)["mode"], describe_header(io.BytesIO(buf.getvalue()))["chunk_size"]
        ('SM4-CBC', 1024)
    """
    return read_header(raw).describe()
