"""``torchaux inspect``: what a checkpoint file holds, and the reading code the CLI shares.

Without a key, an encrypted file shows only its envelope (mode, key size,
chunk size: :func:`torchaux.checkpoint.crypto.envelope.describe_header` reads them
without the key).  A plaintext file, or an encrypted one with its key, also
shows its format, whether it records a CRC (``.ckpt``: the
``.torchaux/crc32`` member; safetensors: ``crc_num`` metadata) and a table of
entries: name, dtype, shape and bytes, then totals.  Inspecting does not
*check* the CRC; ``torchaux verify`` does.

The helpers here (:func:`open_envelope`, :func:`read_plaintext`,
:func:`load_contents`) read a file the way
:func:`torchaux.load_checkpoint` does - content-sniffed format, nothing
unpickled beyond ``torch.load(weights_only=True)`` - but report bytes to a
progress bar and keep what a report needs (metadata, CRC presence).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

import torch

from torchaux.checkpoint.formats.torch_save import integrity
from torchaux.checkpoint.load import (
    detect_format,
    safetensors_entries,
    torch_entries,
    verify_safetensors_crcs,
)
from torchaux.cli.keys import DEC_KEY_ENV, Key, KeySourceError, load_key
from torchaux.cli.progress import Progress, ProgressReader, progress_enabled
from torchaux.errors import IntegrityError

__all__ = [
    "Envelope",
    "Contents",
    "open_envelope",
    "require_key",
    "read_plaintext",
    "load_contents",
    "inspect_file",
    "format_report",
    "format_size",
    "format_counts",
    "printable",
    "run_inspect",
]

_FORMAT_NAMES = {"ckpt": "ckpt (torch.save zip)", "safetensors": "safetensors"}
_HEAD = 16
# Plaintext files are read in pieces of this size so the progress bar moves.
_READ_CHUNK = 8 << 20


@dataclass(frozen=True)
class Envelope:
    """What a file shows without a key: its size and, if encrypted, its header fields."""

    path: str
    size: int
    encryption: dict[str, Any] | None

    @property
    def encrypted(self) -> bool:
        """Whether the file is an encrypted torchaux envelope."""
        return self.encryption is not None


@dataclass(frozen=True)
class Contents:
    """A parsed plaintext checkpoint: format, entries, metadata and CRC presence."""

    format: str
    entries: dict[str, Any]
    metadata: dict[str, str] | None
    crc_present: bool


def printable(text: str) -> str:
    r"""``text`` with every non-printable character escaped as Python would (``\n``, ``\x1b``).

    Tensor names, metadata and file names come from the file, so a crafted one
    could otherwise move the cursor, rewrite earlier lines or fake a report
    line on the terminal (security review, issue #16 item 5).  Unicode
    categories Cc, Cf (bidirectional overrides), Z* but the space, and Co/Cn
    are escaped.

    >>> printable("w\ncrc  present\x1b[1A"), printable("layer.0.weight")
    ('w\\ncrc  present\\x1b[1A', 'layer.0.weight')
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_size(n: int) -> str:
    """Bytes in binary units.

    >>> format_size(512), format_size(3 << 20), format_size(5 << 40)
    ('512 B', '3.0 MiB', '5.0 TiB')
    """
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def format_counts(tensors: int, tensor_bytes: int, values: int) -> str:
    """Entry counts in words.

    >>> format_counts(1, 24, 2)
    '1 tensor (24 B), 2 values'
    """
    return (
        f"{tensors} tensor{'' if tensors == 1 else 's'} ({format_size(tensor_bytes)}), "
        f"{values} value{'' if values == 1 else 's'}"
    )


def open_envelope(path: str) -> Envelope:
    """Check ``path`` is a non-empty regular file and read its encryption header, if any.

    Raises:
        OSError: the file cannot be opened.
        IntegrityError: empty, of no known format, or a damaged header.
        UnsupportedFormatError: encrypted by a newer torchaux.
    """
    from torchaux.checkpoint.crypto.envelope import describe_header

    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{path} is not a regular file")
        head = f.read(_HEAD)
        if not head:
            raise IntegrityError(f"{path} is empty; it holds no checkpoint")
        if detect_format(head) != "encrypted":
            return Envelope(path, st.st_size, None)
        f.seek(0)
        return Envelope(path, st.st_size, describe_header(f))


def require_key(envelope: Envelope, key: Key | None) -> Key:
    """``key``, or a :class:`KeySourceError` saying how to give one for this encrypted file."""
    if key is not None:
        return key
    enc = envelope.encryption or {}
    what = f" ({enc['mode']}, {enc['key_bits']}-bit key)" if enc else ""
    raise KeySourceError(
        f"{envelope.path} is encrypted{what}; give the key with --dec-key-file PATH "
        f"or the {DEC_KEY_ENV} environment variable (hex)"
    )


def read_plaintext(envelope: Envelope, key: Key | None, bar: Progress) -> bytes:
    """The file's plaintext: decrypted and fully verified (every chunk's tag/MAC) if encrypted.

    Raises:
        KeySourceError: encrypted and ``key`` is None.
        DecryptionError: wrong key or tampered data; IntegrityError: truncated or damaged.
    """
    with open(envelope.path, "rb") as f:
        raw = ProgressReader(f, bar)
        out = io.BytesIO()
        if not envelope.encrypted:
            while chunk := raw.read(_READ_CHUNK):
                out.write(chunk)
            return out.getvalue()
        secret = require_key(envelope, key).secret
        from torchaux.checkpoint.crypto.envelope import decrypt_stream

        # mode=None: the mode recorded in the (HMAC-checked) header is the one used.
        decrypt_stream(raw, out, secret, None)  # type: ignore[arg-type]
        return out.getvalue()


def load_contents(data: bytes, path: str, *, check_crc: bool = False) -> Contents:
    """Parse plaintext bytes; with ``check_crc`` also verify every CRC the file records.

    Raises:
        IntegrityError: damaged, unparsable, or (``check_crc``) a CRC mismatch.
    """
    found = detect_format(data[:_HEAD])
    if found == "encrypted":
        raise IntegrityError(f"{path}: the decrypted content is itself encrypted; not a checkpoint")
    if found == "ckpt":
        crc = integrity.verify_zip_crc(data, path) if check_crc else integrity.has_content_crc(data)
        return Contents("ckpt", torch_entries(data, path), None, crc)
    from torchaux.checkpoint.formats.safetensors.writer import CRC_METADATA_KEY, read_safetensors

    tensors, metadata = read_safetensors(data)
    if check_crc:
        verify_safetensors_crcs(tensors, metadata, path)
    entries = safetensors_entries(tensors, metadata, path)
    return Contents("safetensors", entries, metadata, CRC_METADATA_KEY in metadata)


def _row(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {
            "name": name, "kind": "tensor", "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape), "bytes": value.numel() * value.element_size(),
        }
    row: dict[str, Any] = {
        "name": name, "kind": "value", "dtype": type(value).__name__, "shape": None, "bytes": None,
    }
    if isinstance(value, (bool, int, float, str)):
        row["value"] = value
    return row


def inspect_file(path: str, key: Key | None, *, progress: bool | None = None) -> dict[str, Any]:
    """Describe ``path`` as a JSON-ready dict (entries only if plaintext or ``key`` is given).

    Example:
        >>> import os, torch, torchaux
        >>> p = os.path.join(doctest_tmp, "m.ckpt")
        >>> _ = torchaux.save_checkpoint({"w": torch.zeros(2, 3)}, p, crc_check=True)
        >>> info = inspect_file(p, None)
        >>> info["format"], info["crc"]["present"], info["entries"][0]["shape"]
        ('ckpt', True, [2, 3])
    """
    envelope = open_envelope(path)
    report: dict[str, Any] = {
        "file": path, "size": envelope.size, "encrypted": envelope.encrypted,
        "encryption": envelope.encryption, "format": None, "crc": None, "metadata": None,
        "entries": None, "totals": None,
    }
    if envelope.encrypted and key is None:
        return report
    label = os.path.basename(path)
    with Progress(label, envelope.size, enabled=progress_enabled(progress, envelope.size)) as bar:
        data = read_plaintext(envelope, key, bar)
    contents = load_contents(data, path)
    rows = [_row(name, value) for name, value in contents.entries.items()]
    report["format"] = contents.format
    report["crc"] = {
        "present": contents.crc_present,
        "kind": "content-crc32" if contents.format == "ckpt" else "crc_num",
    }
    report["metadata"] = contents.metadata
    report["entries"] = rows
    report["totals"] = {
        "tensors": sum(r["kind"] == "tensor" for r in rows),
        "values": sum(r["kind"] == "value" for r in rows),
        "tensor_bytes": sum(r["bytes"] or 0 for r in rows),
    }
    return report


def _table(rows: list[dict[str, Any]]) -> list[str]:
    has_values = any("value" in r for r in rows)
    header = ["name", "dtype", "shape", "bytes"] + (["value"] if has_values else [])
    cells = [header]
    for r in rows:
        shape = "-" if r["shape"] is None else "[" + ", ".join(map(str, r["shape"])) + "]"
        line = [printable(r["name"]), r["dtype"], shape, "-" if r["bytes"] is None else str(r["bytes"])]
        if has_values:
            line.append(repr(r["value"]) if "value" in r else "")
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = []
    for line in cells:
        padded = [
            c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        ]
        out.append("  ".join(padded).rstrip())
    return out


def format_report(report: dict[str, Any]) -> str:
    """The plain-text form of :func:`inspect_file`'s report."""
    enc = report["encryption"]
    lines = [f"file        {printable(report['file'])} ({format_size(report['size'])})"]
    if enc is not None:
        lines.append(
            f"encryption  {enc['mode']}, {enc['key_bits']}-bit key, {enc['kdf']}, "
            f"{format_size(enc['chunk_size'])} chunks (format version {enc['version']})"
        )
        if enc.get("identity") is not None:
            lines.append(f"identity    {printable(enc['identity'])} (authenticated: enc_aad)")
    else:
        lines.append("encryption  none")
    if report["entries"] is None:
        lines.append(
            f"contents    encrypted; give --dec-key-file PATH or set {DEC_KEY_ENV} to list them"
        )
        return "\n".join(lines)
    crc = report["crc"]
    where = ".torchaux/crc32 member" if crc["kind"] == "content-crc32" else "crc_num metadata"
    lines.append(f"format      {_FORMAT_NAMES[report['format']]}")
    found = f"present ({where}; torchaux verify checks it)" if crc["present"] else "none"
    lines.append(f"crc         {found}")
    t = report["totals"]
    lines.append(
        f"entries     {format_counts(t['tensors'], t['tensor_bytes'], t['values'])}"
    )
    lines.append("")
    lines.extend(_table(report["entries"]))
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    """The ``inspect`` subcommand: print the report; exit status 0.

    A directory is a distributed checkpoint (:mod:`torchaux.cli.sharded`):
    its report comes from the metadata, so no key is needed (or used).
    """
    if os.path.isdir(args.file):
        from torchaux.cli.sharded import format_dir_report, inspect_dir

        report = inspect_dir(args.file)
        print(json.dumps(report, indent=2) if args.json else format_dir_report(report))
        return 0
    key = load_key(args.dec_key_file, DEC_KEY_ENV)
    report = inspect_file(args.file, key, progress=args.progress)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0
