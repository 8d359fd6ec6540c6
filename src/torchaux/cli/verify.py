"""``torchaux verify``: exit status 0 only if a checkpoint is complete and intact.

What is checked, in order, before anything is declared good:

1. the file is a non-empty regular file of a known format;
2. an encrypted file: the header (CRC-32, fields, HMAC under the key) and
   every chunk's tag or MAC, through to the final chunk, so a wrong key, a
   changed byte, a cut or an appended byte fails;
3. ``.ckpt``: every zip member's CRC-32 and, if recorded, the content CRC
   (:mod:`torchaux.checkpoint.formats.torch_save.integrity`); safetensors: the header and data
   layout, and ``crc_num`` if recorded;
4. the content parses as :func:`torchaux.load_checkpoint` would parse it
   (``torch.load(weights_only=True)``, or the safetensors reader and the
   ``torchaux.values`` metadata).

Exit status: 0 intact; 1 not (one-line reason on stderr); 2 usage errors,
including an encrypted file without a key.  A plaintext safetensors file
without ``crc_num`` has no checksum, so step 3 cannot see a changed tensor
byte; ``--require-crc`` makes such files (and ``.ckpt`` files without a
content CRC) fail.  As with ``load_checkpoint(dec_key=...)``, a file that is
not encrypted fails when a decryption key is given (it may have been
replaced); note that ``TORCHAUX_DEC_KEY`` in the environment counts as given.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from torchaux.cli.inspect import (
    Envelope,
    format_counts,
    load_contents,
    open_envelope,
    read_plaintext,
    require_key,
)
from torchaux.cli.keys import DEC_KEY_ENV, Key, load_key
from torchaux.cli.progress import Progress, progress_enabled
from torchaux.errors import DecryptionError, IntegrityError

__all__ = ["verify_file", "run_verify"]

_CRC_TEXT = {
    ("ckpt", "verified"): "content CRC and member CRCs verified",
    ("ckpt", "none"): "member CRCs verified (no content CRC recorded)",
    ("safetensors", "verified"): "crc_num verified",
    ("safetensors", "none"): "no crc_num recorded",
}


def _encryption_text(envelope: Envelope) -> str:
    enc = envelope.encryption
    if enc is None:
        return "not encrypted"
    return f"{enc['mode']} {enc['key_bits']}-bit, every chunk authenticated"


def verify_file(
    path: str, key: Key | None, *, require_crc: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Fully check ``path``; return a summary, or raise on the first problem.

    Args:
        path: the checkpoint file.
        key: its decryption key (required if it is encrypted).
        require_crc: also fail if the file records no CRC.
        progress: draw a progress bar (None: only on a terminal, for big files).

    Returns:
        ``file``, ``format``, ``encryption`` (header fields or None), ``crc``
        (``"verified"`` or ``"none"``), ``tensors``, ``values`` and ``tensor_bytes``.

    Raises:
        KeySourceError: encrypted and no key.
        DecryptionError: a key was given for an unencrypted file, wrong key, tampering.
        IntegrityError: truncated, damaged, CRC mismatch, unparsable, or
            (``require_crc``) no CRC.

    Example:
        >>> import os, torch, torchaux
        >>> p = os.path.join(doctest_tmp, "v.safetensors")
        >>> _ = torchaux.save_checkpoint({"w": torch.ones(4)}, p, format="safetensors",
        ...                              crc_check=True)
        >>> verify_file(p, None)["crc"]
        'verified'
    """
    envelope = open_envelope(path)
    if envelope.encrypted:
        require_key(envelope, key)
    elif key is not None:
        raise DecryptionError(
            f"{path} is not encrypted, but a decryption key was given ({key.source}); an "
            "unencrypted file where an encrypted one is expected may have been replaced "
            f"(drop --dec-key-file / unset {DEC_KEY_ENV} if plaintext is expected)"
        )
    label = os.path.basename(path)
    with Progress(label, envelope.size, enabled=progress_enabled(progress, envelope.size)) as bar:
        data = read_plaintext(envelope, key, bar)
    contents = load_contents(data, path, check_crc=True)
    if require_crc and not contents.crc_present:
        raise IntegrityError(
            f"{path} records no CRC (saved without crc_check) and --require-crc was given"
        )
    tensors = [v for v in contents.entries.values() if isinstance(v, torch.Tensor)]
    return {
        "file": path,
        "format": contents.format,
        "encryption": envelope.encryption,
        "encryption_text": _encryption_text(envelope),
        "crc": "verified" if contents.crc_present else "none",
        "tensors": len(tensors),
        "values": len(contents.entries) - len(tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


def run_verify(args: argparse.Namespace) -> int:
    """The ``verify`` subcommand: one ``OK`` line on stdout and exit 0, or raise.

    A directory is a distributed checkpoint (:mod:`torchaux.cli.sharded.check`).
    """
    key = load_key(args.dec_key_file, DEC_KEY_ENV)
    if os.path.isdir(args.file):
        from torchaux.cli.sharded import summary_line, verify_dir

        summary = verify_dir(args.file, key, require_crc=args.require_crc, progress=args.progress)
        if not args.quiet:
            print(summary_line(summary))
        return 0
    s = verify_file(args.file, key, require_crc=args.require_crc, progress=args.progress)
    crc = _CRC_TEXT[s["format"], s["crc"]]
    if not args.quiet:
        print(
            f"OK {s['file']}: {s['format']}, {s['encryption_text']}, {crc}, "
            f"{format_counts(s['tensors'], s['tensor_bytes'], s['values'])}"
        )
    return 0
