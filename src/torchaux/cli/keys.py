"""Where the command line gets encryption keys: key files and environment variables, never argv.

A key on the command line leaks into shell history, ``ps`` output and
``/proc/<pid>/cmdline``, so the CLI has no option that takes one.  Keys come
from, in this order:

1. ``--dec-key-file PATH`` / ``--enc-key-file PATH``: the file's bytes.  A file
   holding exactly 32, 48 or 64 hexadecimal digits (any case), optionally
   followed by one newline (``\\n`` or ``\\r\\n``), is hex-decoded into a 16-,
   24- or 32-byte key; any other content is used byte for byte as the raw key
   (16, 24 or 32 bytes, no newline stripped).  On POSIX, as ssh requires for
   private keys, the file must be owned by the current user (or root) and not
   accessible to group or others (``chmod 600 PATH``), and its directory must
   be owned by the current user or root and not writable by group or others
   (unless sticky, like ``/tmp``): a key others can read is no longer secret,
   and one others can write or replace could be swapped for a key an attacker
   knows.
2. The environment variables ``TORCHAUX_DEC_KEY`` / ``TORCHAUX_ENC_KEY``,
   holding the key as 32, 48 or 64 hex digits (surrounding whitespace ignored).

Every error names the source (path or variable), never its content, and a
:class:`Key` never shows its bytes in ``repr``.  :func:`redact` hides, in any
text the CLI prints, runs of hex digits as long as a key (a key typed where a
path or mode belongs).
"""

from __future__ import annotations

import binascii
import os
import re
import stat
from dataclasses import dataclass, field

__all__ = [
    "KeySourceError",
    "Key",
    "DEC_KEY_ENV",
    "ENC_KEY_ENV",
    "KEY_LENGTHS",
    "parse_key_bytes",
    "read_key_file",
    "read_key_env",
    "load_key",
    "redact",
]

#: Environment variable holding the decryption key (hex).
DEC_KEY_ENV = "TORCHAUX_DEC_KEY"
#: Environment variable holding the encryption key (hex).
ENC_KEY_ENV = "TORCHAUX_ENC_KEY"
#: Key lengths in bytes that some mode accepts (AES: all three, SM4: 16).
KEY_LENGTHS = (16, 24, 32)
_HEX_LENGTHS = tuple(2 * n for n in KEY_LENGTHS)
# Read at most this much of a key file: a bigger file is certainly not a key,
# and reading it whole could be slow or exhaust memory.
_MAX_KEY_FILE_BYTES = 4096
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# 32 or more hex digits in a row: at least a 128-bit key's worth (a SHA-1 hash,
# 40 digits, is hidden too: a false positive costs a less helpful message).
_KEY_LIKE = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{32,}(?![0-9A-Fa-f])")


def redact(text: str) -> str:
    """``text`` with every run of 32+ hex digits (what a key looks like) replaced.

    >>> redact("invalid choice: '" + "ab" * 16 + "'")
    "invalid choice: '<32 hex digits hidden>'"
    """
    return _KEY_LIKE.sub(lambda m: f"<{len(m.group())} hex digits hidden>", text)


class KeySourceError(ValueError):
    """A key cannot be obtained: its file or variable is missing, unprotected or malformed."""


@dataclass(frozen=True)
class Key:
    """A secret key and a description of where it came from (safe to print).

    Example:
        >>> k = Key(bytes(16), "env TORCHAUX_DEC_KEY")
        >>> k, k.bits
        (Key(<128-bit key from env TORCHAUX_DEC_KEY>), 128)
    """

    secret: bytes = field(repr=False)
    source: str

    @property
    def bits(self) -> int:
        """Key length in bits."""
        return 8 * len(self.secret)

    def __repr__(self) -> str:
        return f"Key(<{self.bits}-bit key from {self.source}>)"


def _check_length(key: bytes, source: str, form: str) -> bytes:
    if len(key) not in KEY_LENGTHS:
        raise KeySourceError(
            f"{source} holds a {len(key)}-byte {form} key; expected 16, 24 or 32 raw bytes, "
            "or 32, 48 or 64 hex digits (generate one with: "
            "python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


def parse_key_bytes(data: bytes, source: str) -> bytes:
    """Turn a key file's content into key bytes (hex if it is 32/48/64 hex digits, else raw).

    Args:
        data: the file's bytes.
        source: how to name the file in errors (never its content).

    Returns:
        The key, 16, 24 or 32 bytes.

    Raises:
        KeySourceError: the content is neither form.

    Example:
        >>> parse_key_bytes(b"00" * 16 + b"\\n", "k.hex") == bytes(16)
        True
        >>> parse_key_bytes(b"\\x01" * 24, "k.bin") == b"\\x01" * 24
        True
    """
    text = data
    if text.endswith(b"\r\n"):
        text = text[:-2]
    elif text.endswith(b"\n"):
        text = text[:-1]
    if len(text) in _HEX_LENGTHS and set(text) <= _HEX_DIGITS:
        return bytes.fromhex(text.decode("ascii"))
    return _check_length(data, source, "raw")


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _check_private(st: os.stat_result, path: str) -> None:
    # Windows has no POSIX permission bits worth checking (ACLs instead).
    if os.name == "nt":
        return
    if not _trusted_owner(st.st_uid):
        raise KeySourceError(
            f"key file {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or "
            "root; its owner can change it: use a key file you own (chmod 600)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeySourceError(
            f"key file {path} is accessible to group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); a shared key is not secret: run 'chmod 600 {path}'"
        )


def _check_directory(path: str) -> None:
    """The directories holding ``path`` (and its link target) must not let others replace it."""
    if os.name == "nt":
        return
    for directory in {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}:
        st = os.stat(directory)
        mode = stat.S_IMODE(st.st_mode)
        # A sticky directory (/tmp) lets only a file's owner rename or delete it.
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise KeySourceError(
                f"key file {path} is in directory {directory} (mode {mode:04o}), which group or "
                "others can write: they could replace the key; move it to a private "
                f"directory or run 'chmod go-w {directory}'"
            )
        if not _trusted_owner(st.st_uid):
            raise KeySourceError(
                f"key file {path} is in directory {directory}, owned by uid {st.st_uid}, not by "
                "you or root: its owner could replace the key; move it to a directory you own"
            )


def _looks_like_key(text: str) -> bool:
    return len(text) in _HEX_LENGTHS and set(text.encode("utf-8", "replace")) <= _HEX_DIGITS


def read_key_file(path: str) -> Key:
    """Read a key file (see the module docstring for the accepted content).

    Raises:
        KeySourceError: the file is missing, unreadable, not a regular file or
            pipe, accessible to group/others, or does not hold a key.

    Example:
        >>> import os
        >>> p = os.path.join(doctest_tmp, "key.hex")
        >>> fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
        >>> _ = os.write(fd, b"ab" * 32 + b"\\n"); os.close(fd)
        >>> read_key_file(p).bits
        256
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
                raise KeySourceError(f"key file {path} is not a regular file")
            _check_private(st, path)
            _check_directory(path)
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        if _looks_like_key(path):
            # Never echo what may be the key itself, typed where its file's path belongs.
            raise KeySourceError(
                "the key file path looks like a key itself and names no readable file; keys "
                "are never accepted on the command line: write the key to a file (chmod 600) "
                "and pass its path"
            ) from None
        raise KeySourceError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeySourceError(
            f"key file {path} is over {_MAX_KEY_FILE_BYTES} bytes; it does not hold a key"
        )
    return Key(parse_key_bytes(data, f"key file {path}"), f"key file {path}")


def read_key_env(name: str) -> Key | None:
    """The hex key in environment variable ``name``, or None if it is unset or empty.

    Raises:
        KeySourceError: the value is not 32, 48 or 64 hex digits.

    Example:
        >>> os.environ["TORCHAUX_DOCTEST_KEY"] = "11" * 16
        >>> read_key_env("TORCHAUX_DOCTEST_KEY").bits
        128
        >>> del os.environ["TORCHAUX_DOCTEST_KEY"]
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    source = f"environment variable {name}"
    try:
        key = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise KeySourceError(
            f"{source} must hold the key as 32, 48 or 64 hex digits; it holds "
            f"{len(value)} characters that are not valid hex"
        ) from None
    return Key(_check_length(key, source, "hex-decoded"), f"env {name}")


def load_key(path: str | None, env_name: str) -> Key | None:
    """The key from ``path`` if given, else from ``env_name``, else None.

    Example:
        >>> load_key(None, "TORCHAUX_DOCTEST_UNSET") is None
        True
    """
    if path is not None:
        return read_key_file(path)
    return read_key_env(env_name)
