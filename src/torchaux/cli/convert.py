"""``torchaux convert``: rewrite a checkpoint in another format and/or with other encryption.

SRC is read with :func:`torchaux.load_checkpoint` (format from the content;
an encrypted SRC needs its key, and its mode comes from its header; every
chunk, and the CRC if SRC records one, is verified) and written with
:func:`torchaux.save_checkpoint` (``--format``, ``--enc-key-file`` /
``TORCHAUX_ENC_KEY`` and ``--enc-mode``, a CRC unless ``--no-crc``, mode
0600).  DST is replaced atomically (temp file, fsync, rename) or not at all;
an existing DST needs ``--force`` and DST may not be SRC.  Tensors keep their
dtype and shape; the ``int``/``float``/``bool``/``str`` entries saved with
``append_dict`` carry over (safetensors holds them as JSON metadata).

The progress bar covers the write of DST; reading SRC shows none, because
``load_checkpoint`` has no progress hook.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from typing import IO, Any

import torch

from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.engine.saver import AsyncSaver
from torchaux.checkpoint.load import load_checkpoint
from torchaux.checkpoint.save import save_checkpoint
from torchaux.cli.inspect import format_counts, open_envelope, require_key
from torchaux.cli.keys import DEC_KEY_ENV, ENC_KEY_ENV, Key, KeySourceError, load_key
from torchaux.cli.progress import Progress, ProgressWriter, progress_enabled

__all__ = ["convert_file", "run_convert", "DEFAULT_ENC_MODE", "FILE_MODE"]

#: Encryption mode when a key is given without ``--enc-mode``.
DEFAULT_ENC_MODE = "AES-GCM"
#: Permission bits of DST (save_checkpoint's default: checkpoints are private).
FILE_MODE = 0o600
# Seconds to wait for the private writer thread to stop after the save returned.
_CLOSE_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _counting_sink(path: str, bar: Progress) -> Iterator[IO[bytes]]:
    with atomic_write(path, mode=FILE_MODE) as f:
        yield ProgressWriter(f, bar)  # type: ignore[misc]


def _check_paths(src: str, dst: str, force: bool) -> str | None:
    """A usage problem with SRC/DST, or None."""
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and os.path.exists(dst) and os.path.exists(src):
        same = os.path.samefile(src, dst)
    if same:
        return f"DST {dst} is SRC; write to another file (DST is replaced atomically)"
    if os.path.lexists(dst) and not force:
        return f"DST {dst} exists; pass --force to replace it"
    return None


def _load(src: str, dec_key: Key | None, warn: list[str]) -> dict[str, Any]:
    envelope = open_envelope(src)
    dec_mode = DEFAULT_ENC_MODE
    if envelope.encryption is not None:
        require_key(envelope, dec_key)
        dec_mode = envelope.encryption["mode"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = load_checkpoint(
            src, dec_key=None if dec_key is None else dec_key.secret, dec_mode=dec_mode,
            crc_check=True,
        )
    warn.extend(str(w.message) for w in caught)
    return entries


def convert_file(
    src: str,
    dst: str,
    *,
    format: str,
    dec_key: Key | None = None,
    enc_key: Key | None = None,
    enc_mode: str = DEFAULT_ENC_MODE,
    crc: bool = True,
    progress: bool | None = None,
    warn: list[str] | None = None,
) -> dict[str, Any]:
    """Load ``src`` and save it to ``dst`` as ``format`` (paths are not checked here).

    Returns:
        ``tensors``, ``values`` and ``tensor_bytes`` of what was written.

    Raises:
        KeySourceError: SRC is encrypted and ``dec_key`` is None, or ``enc_key``
            does not fit ``enc_mode``.
        ValueError, TypeError: what load_checkpoint/save_checkpoint raise
            (IntegrityError and DecryptionError are ValueErrors).

    Example:
        >>> import os, torch, torchaux
        >>> src, dst = (os.path.join(doctest_tmp, n) for n in ("a.ckpt", "a.safetensors"))
        >>> _ = torchaux.save_checkpoint({"w": torch.ones(2)}, src, append_dict={"step": 7})
        >>> convert_file(src, dst, format="safetensors")["values"]
        1
        >>> torchaux.load_checkpoint(dst, crc_check=True)["step"]
        7
    """
    if enc_key is not None:
        from torchaux.checkpoint.crypto.header import validate_key

        try:
            validate_key(enc_key.secret, enc_mode)
        except ValueError as exc:
            raise KeySourceError(f"{enc_key.source}: {exc}") from None
    entries = _load(src, dec_key, warn if warn is not None else [])
    tensors = [v for v in entries.values() if isinstance(v, torch.Tensor)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    label = os.path.basename(dst)
    with Progress(label, total, enabled=progress_enabled(progress, total)) as bar:
        saver = AsyncSaver(sink=functools.partial(_counting_sink, bar=bar), name="torchaux-convert")
        try:
            save_checkpoint(
                entries, dst, enc_key=None if enc_key is None else enc_key.secret,
                enc_mode=enc_mode, crc_check=crc, format=format, saver=saver,
            )
        finally:
            saver.close(timeout=_CLOSE_TIMEOUT_S)
    return {"tensors": len(tensors), "values": len(entries) - len(tensors), "tensor_bytes": total}


def _usage_error(message: str) -> int:
    print(f"torchaux convert: error: {message}", file=sys.stderr)
    return 2


def run_convert(args: argparse.Namespace) -> int:
    """The ``convert`` subcommand: one summary line on stdout; exit 0, or 2 for usage errors."""
    problem = _check_paths(args.src, args.dst, args.force)
    if problem is not None:
        return _usage_error(problem)
    enc_key = load_key(args.enc_key_file, ENC_KEY_ENV)
    if args.enc_mode is not None and enc_key is None:
        return _usage_error(
            f"--enc-mode {args.enc_mode} needs an encryption key: --enc-key-file PATH or "
            f"the {ENC_KEY_ENV} environment variable"
        )
    dec_key = load_key(args.dec_key_file, DEC_KEY_ENV)
    mode = args.enc_mode or DEFAULT_ENC_MODE
    warn: list[str] = []
    s = convert_file(
        args.src, args.dst, format=args.format, dec_key=dec_key, enc_key=enc_key,
        enc_mode=mode, crc=not args.no_crc, progress=args.progress, warn=warn,
    )
    for message in warn:
        print(f"torchaux convert: warning: {' '.join(message.split())}", file=sys.stderr)
    enc = "not encrypted" if enc_key is None else f"{mode} {enc_key.bits}-bit ({enc_key.source})"
    print(
        f"converted {args.src} -> {args.dst}: {args.format}, {enc}, "
        f"{'no CRC' if args.no_crc else 'CRC'}, "
        f"{format_counts(s['tensors'], s['tensor_bytes'], s['values'])}"
    )
    return 0
