"""The encrypted envelope: streaming, authenticated, chunked.

* :mod:`~torchaux.checkpoint.crypto.envelope` — the byte layout and the public entry points;
* :mod:`~torchaux.checkpoint.crypto.header` — the self-describing header, key checks, key derivation;
* :mod:`~torchaux.checkpoint.crypto.chunks` — the per-chunk ciphers (AES-GCM, AES-CBC, SM4-CBC);
* :mod:`~torchaux.checkpoint.crypto.pipeline` — ordered parallel sealing and opening;
* :mod:`~torchaux.checkpoint.crypto.writer` / :mod:`~torchaux.checkpoint.crypto.reader` — the
  encrypting and decrypting file objects.
"""

from torchaux.checkpoint.crypto.envelope import (
    DEFAULT_CHUNK_SIZE,
    KEY_SIZES,
    DecryptingReader,
    EncryptingWriter,
    decrypt_stream,
    describe_header,
    is_encrypted,
    validate_key,
)

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
