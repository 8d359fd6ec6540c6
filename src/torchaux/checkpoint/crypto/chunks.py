"""Sealing and opening the chunks of an encrypted checkpoint, one at a time.

The layout is documented in :mod:`torchaux.checkpoint.crypto.envelope`.  A
:class:`ChunkCipher` holds only immutable per-file state (derived keys, header
hash), so the stream classes call it from several threads at once; the heavy
calls (``update_into``, ``hmac.update``) release the GIL.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

from torchaux.checkpoint.crypto.header import Header, derive_key, require_cryptography
from torchaux.errors import DecryptionError, IntegrityError

__all__ = ["ChunkCipher", "cipher_for"]

_BLOCK = 16
_GCM_TAG = 16
_CBC_IV = 16
_MAC = 32


class ChunkCipher:
    """Seals and opens the chunks of one stream (thread-safe: no per-call state).

    Every record binds the header, the chunk index and the final flag, so a
    record moved, duplicated or cut short fails to open.  Build one with
    :func:`cipher_for`.
    """

    #: Bytes of random IV each :meth:`seal` call needs (0: derived from the index).
    iv_size = 0
    #: Extra bytes a plaintext ``out`` buffer of :meth:`open` needs past the chunk size.
    plain_slack = 0

    def __init__(self, key: bytes, header: Header) -> None:
        algorithms = require_cryptography()
        self.chunk_size = header.chunk_size
        self._header_hash = hashlib.sha256(header.raw).digest()
        cipher_key = derive_key(key, header, b"cipher-key", len(key))
        self._algorithm = getattr(algorithms, header.mode.algorithm)(cipher_key)
        self._init(key, header)
        #: Bytes of a full (non-final) chunk's record; a final record is shorter.
        self.full_record = self.record_size(self.chunk_size)

    def _init(self, key: bytes, header: Header) -> None:
        raise NotImplementedError

    def record_size(self, plain: int) -> int:
        """On-disk bytes of a chunk holding ``plain`` plaintext bytes."""
        raise NotImplementedError

    def seal(self, index: int, final: bool, src: memoryview, out: bytearray, iv: bytes) -> int:
        """Encrypt chunk ``index`` from ``src`` into ``out``; return the record length."""
        raise NotImplementedError

    def open(self, index: int, final: bool, record: memoryview, out: bytearray) -> int:
        """Verify, then decrypt, one record into ``out``; return the plaintext length."""
        raise NotImplementedError

    def _binding(self, index: int, final: bool) -> bytes:
        return self._header_hash + struct.pack(">QB", index, final)


def cipher_for(key: bytes, header: Header) -> ChunkCipher:
    """The chunk cipher of ``header``'s mode (``key`` already checked)."""
    return _GcmCipher(key, header) if header.mode.aead else _CbcHmacCipher(key, header)


class _GcmCipher(ChunkCipher):
    """AES-GCM: record = ciphertext || 16-byte tag; nonce = prefix || index."""

    def _init(self, key: bytes, header: Header) -> None:
        self._prefix = header.nonce_prefix

    def record_size(self, plain: int) -> int:
        return plain + _GCM_TAG

    def _context(self, index: int, final: bool, tag: bytes | None, encrypt: bool) -> Any:
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        cipher = Cipher(self._algorithm, modes.GCM(self._prefix + struct.pack(">Q", index), tag))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        ctx.authenticate_additional_data(self._binding(index, final))
        return ctx

    def seal(self, index: int, final: bool, src: memoryview, out: bytearray, iv: bytes) -> int:
        n = len(src)
        encryptor = self._context(index, final, None, True)
        encryptor.update_into(src, out)
        encryptor.finalize()
        out[n : n + _GCM_TAG] = encryptor.tag
        return n + _GCM_TAG

    def open(self, index: int, final: bool, record: memoryview, out: bytearray) -> int:
        from cryptography.exceptions import InvalidTag

        n = len(record) - _GCM_TAG
        if n < 0:
            raise _short_record(index, len(record), _GCM_TAG)
        decryptor = self._context(index, final, bytes(record[n:]), False)
        decryptor.update_into(record[:n], out)
        try:
            decryptor.finalize()
        except InvalidTag:
            raise _forged(index, final, "AES-GCM tag") from None
        return n


class _CbcHmacCipher(ChunkCipher):
    """CBC + PKCS#7, then HMAC-SHA256 (encrypt-then-MAC): record = iv || ciphertext || mac."""

    iv_size = _CBC_IV
    # CBC update_into wants len(data) + 15 bytes of room; the padding block is in the data.
    plain_slack = 2 * _BLOCK

    def _init(self, key: bytes, header: Header) -> None:
        mac_key = derive_key(key, header, b"mac-key", _MAC)
        self._mac = hmac.new(mac_key, digestmod="sha256")

    def record_size(self, plain: int) -> int:
        return _CBC_IV + (plain // _BLOCK + 1) * _BLOCK + _MAC

    def _tag(self, index: int, final: bool, iv_and_ciphertext: memoryview) -> bytes:
        mac = self._mac.copy()
        mac.update(self._binding(index, final))
        mac.update(iv_and_ciphertext)
        return mac.digest()

    def seal(self, index: int, final: bool, src: memoryview, out: bytearray, iv: bytes) -> int:
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        n = len(src)
        whole = n - n % _BLOCK
        pad = _BLOCK - n % _BLOCK  # PKCS#7: always 1..16 bytes
        dst = memoryview(out)
        dst[:_CBC_IV] = iv
        encryptor = Cipher(self._algorithm, modes.CBC(iv)).encryptor()
        if whole:
            encryptor.update_into(src[:whole], dst[_CBC_IV:])
        encryptor.update_into(bytes(src[whole:]) + bytes([pad]) * pad, dst[_CBC_IV + whole :])
        encryptor.finalize()
        end = _CBC_IV + whole + _BLOCK
        dst[end : end + _MAC] = self._tag(index, final, dst[:end])
        return end + _MAC

    def open(self, index: int, final: bool, record: memoryview, out: bytearray) -> int:
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        n = len(record)
        body = n - _CBC_IV - _MAC
        if body < _BLOCK or body % _BLOCK:
            raise _short_record(index, n, _CBC_IV + _BLOCK + _MAC)
        expected = self._tag(index, final, record[: n - _MAC])
        if not hmac.compare_digest(expected, bytes(record[n - _MAC :])):
            raise _forged(index, final, "HMAC-SHA256")
        decryptor = Cipher(self._algorithm, modes.CBC(bytes(record[:_CBC_IV]))).decryptor()
        decryptor.update_into(record[_CBC_IV : n - _MAC], out)
        decryptor.finalize()
        pad = out[body - 1]
        if not 1 <= pad <= _BLOCK or out[body - pad : body] != bytes([pad]) * pad:
            # Unreachable unless the writer is broken: the MAC already verified.
            raise _forged(index, final, "PKCS#7 padding")
        return body - pad


def _short_record(index: int, found: int, minimum: int) -> IntegrityError:
    return IntegrityError(
        f"encrypted checkpoint is truncated or extended: chunk {index} is the last one and has "
        f"{found} bytes, expected at least {minimum} in a valid layout; restore the file"
    )


def _forged(index: int, final: bool, check: str) -> DecryptionError:
    role = "final chunk" if final else "chunk"
    return DecryptionError(
        f"{role} {index} failed authentication ({check} mismatch): expected the bytes written "
        "at save time, found modified, truncated, appended or reordered data; the file is "
        "corrupt or was tampered with, restore it from a good copy"
    )
