"""``torchaux verify DIR``: a distributed checkpoint is complete and every byte intact.

Checks, in order; the first failure raises, naming the file and the tensor:

1. ``.metadata`` is present (its atomic rename is the commit: without it
   nothing was committed) and parses with torchaux's allow-list;
2. the metadata is whole: every shard of every tensor and every value has a
   stored chunk, the shards of each tensor lie inside it and cover it, and
   (torchaux checkpoints) every chunk has a checksum;
3. every referenced data file is present, a regular file, exactly as long as
   its chunks;
4. every chunk is read: its checksum (xxh3-64 or CRC-32, over the stored
   bytes, so this holds for encrypted chunks without the key); then
   plaintext chunks - each is one ``torch.save`` zip - have their zip
   structure checked (and, where no checksum is recorded, as in stock DCP,
   every member's CRC-32; torchaux writes CRC 0 there, its checksum covering
   the same bytes) and are parsed with ``torch.load(weights_only=True)``, the
   tensor's dtype and shard shape matching the metadata.  Encrypted chunks
   with the key are decrypted (every tag/MAC authenticated, the header's mode
   must be the recorded one) and then checked as plaintext; without the key
   only their envelope headers are checked, and the summary says so.

A stock DCP directory has no checksums: step 4's zip CRCs still see a changed
byte in tensor data; ``--require-crc`` makes such directories fail.

>>> import torch, torchaux.distributed as td
>>> d = os.path.join(doctest_tmp, "vd")
>>> _ = td.save({"w": torch.ones(4), "step": 3}, d)
>>> s = verify_dir(d, None)
>>> s["checksum"], s["chunks"], s["decrypted"]
('xxh3-64', 2, None)
"""

from __future__ import annotations

import io
import math
import os
import pickle
from typing import Any

import torch

from torchaux.checkpoint.formats.torch_save import integrity
from torchaux.cli.keys import DEC_KEY_ENV, Key
from torchaux.cli.progress import Progress, progress_enabled
from torchaux.cli.sharded.index import Chunk, Index, dtype_name, read_index, tensor_bytes
from torchaux.distributed.checksums import checksum as compute_checksum
from torchaux.errors import DecryptionError, IntegrityError, UnsupportedFormatError

__all__ = ["verify_dir", "summary_line"]


def _check_tables(ix: Index) -> None:
    stored: dict[str, list[Chunk]] = {}
    for c in ix.chunks:
        stored.setdefault(c.fqn, []).append(c)
    for name, md in ix.tensors().items():
        chunks = stored.get(name, [])
        have = {tuple(c.offsets or ()) for c in chunks}
        for box in md.chunks:
            if tuple(map(int, box.offsets)) not in have:
                raise IntegrityError(
                    f"{ix.path}/.metadata lists a shard of {name!r} at offsets "
                    f"{list(box.offsets)} with no stored chunk: the checkpoint is incomplete"
                )
        covered = 0
        for box in md.chunks:
            if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(box.offsets, box.sizes, md.size)):
                raise IntegrityError(
                    f"{ix.path}/.metadata: a shard of {name!r} (offsets {list(box.offsets)}, sizes "
                    f"{list(box.sizes)}) lies outside its shape {list(md.size)}"
                )
            covered += math.prod(box.sizes)
        if covered != math.prod(md.size):
            raise IntegrityError(
                f"{ix.path}/.metadata: the shards of {name!r} hold {covered} elements, its shape "
                f"{list(md.size)} has {math.prod(md.size)}: shards are missing or overlap"
            )
        for c in chunks:
            if c.sizes is None:
                raise IntegrityError(f"{ix.path}/.metadata: chunk {c.where} matches no shard of it")
    for name in ix.values():
        if name not in stored:
            raise IntegrityError(f"{ix.path}/.metadata lists value {name!r} with no stored chunk")
    if ix.extras is not None:
        for c in ix.chunks:
            if c.checksum is None:
                raise IntegrityError(
                    f"{ix.path}/.metadata records checksums ({ix.checksum}) but none for the chunk "
                    f"of {c.where} in {c.file} (offset {c.offset}): the metadata is damaged"
                )


def _check_files(ix: Index) -> None:
    for f in ix.files.values():
        holds = ", ".join(sorted({repr(c.fqn) for c in f.chunks})[:3])
        rank = "" if f.rank is None else f" (rank {f.rank})"
        if f.size is None:
            raise IntegrityError(
                f"data file {f.name}{rank} of {ix.path} is missing or not a regular file; it holds "
                f"{holds}{' and more' if len(f.chunks) > 3 else ''}: the checkpoint is incomplete"
            )
        if f.size != f.expected_size:
            what = "truncated" if f.size < f.expected_size else "longer than its chunks (appended to)"
            raise IntegrityError(
                f"data file {f.name}{rank} of {ix.path} is {what}: {f.size} bytes, its chunks "
                f"({holds}{' and more' if len(f.chunks) > 3 else ''}) end at byte {f.expected_size}"
            )


def _decrypt(raw: bytes, c: Chunk, ix: Index, key: Key) -> bytes:
    from torchaux.checkpoint.crypto.envelope import decrypt_stream, describe_header

    mode = describe_header(io.BytesIO(raw))["mode"]
    if ix.extras is not None and mode != ix.encryption:
        raise IntegrityError(
            f"chunk of {c.where} in data file {c.file} is encrypted with {mode}, the metadata "
            f"records {ix.encryption}: a chunk was swapped in"
        )
    out = io.BytesIO()
    try:
        decrypt_stream(io.BytesIO(raw), out, key.secret, None)  # mode: the header's (HMAC-checked)
    except DecryptionError as exc:
        raise DecryptionError(f"data file {c.file}, chunk of {c.where}: {exc}") from exc
    except IntegrityError as exc:
        raise IntegrityError(f"data file {c.file}, chunk of {c.where}: {exc}") from exc
    return out.getvalue()


def _check_plain(raw: bytes, c: Chunk, ix: Index) -> None:
    label = f"data file {c.file}, chunk of {c.where}"
    if c.checksum is None:
        integrity.verify_zip_crc(raw, label)  # stock DCP: every member's CRC-32 is all there is
    else:
        # torchaux writes these zips with CRC 0 (distributed/writer.py: the chunk
        # checksum, already verified, covers the same bytes): check the structure only.
        integrity.check_members(raw, label)
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsupportedFormatError(f"{label}: weights_only loading refuses it ({exc})") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise IntegrityError(f"{label} does not load: {exc}") from exc
    if c.kind != "tensor":
        return
    md = ix.tensors()[c.fqn]
    if not isinstance(obj, torch.Tensor):
        raise IntegrityError(f"{label} holds a {type(obj).__name__}, expected a tensor shard")
    if list(obj.shape) != c.sizes or obj.dtype != md.properties.dtype:
        raise IntegrityError(
            f"{label} holds a {dtype_name(obj.dtype)} tensor of shape {list(obj.shape)}, the "
            f"metadata expects {dtype_name(md.properties.dtype)} {c.sizes}"
        )


def _check_chunk(f: Any, c: Chunk, ix: Index, key: Key | None) -> bool:
    """Check one chunk; True if its content was checked (plaintext, or decrypted with ``key``)."""
    f.seek(c.offset)
    raw = f.read(c.length)
    if len(raw) != c.length:
        raise IntegrityError(f"data file {c.file} is truncated inside the chunk of {c.where}")
    if c.checksum is not None and compute_checksum(raw, str(ix.checksum)) != c.checksum:
        raise IntegrityError(
            f"checksum mismatch in data file {c.file} for {c.where} (chunk at offset {c.offset}, "
            f"{c.length} bytes, {ix.checksum}): the file is corrupt"
        )
    if c.transforms and not c.encrypted:
        raise UnsupportedFormatError(
            f"chunk of {c.where} in {c.file} uses stream extensions {c.transforms} that torchaux "
            "does not read"
        )
    if c.encrypted:
        if key is None:
            from torchaux.checkpoint.crypto.envelope import describe_header

            try:
                describe_header(io.BytesIO(raw))
            except IntegrityError as exc:
                raise IntegrityError(f"data file {c.file}, chunk of {c.where}: {exc}") from exc
            return False
        raw = _decrypt(raw, c, ix, key)
    _check_plain(raw, c, ix)
    return True


def verify_dir(
    path: str, key: Key | None, *, require_crc: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Fully check the distributed checkpoint at ``path``; return a summary or raise.

    Args:
        path: the checkpoint directory.
        key: its decryption key; without one an encrypted checkpoint's chunks
            are checked against their checksums but not decrypted.
        require_crc: also fail if no per-chunk checksums are recorded (stock DCP).
        progress: draw a progress bar (None: only on a terminal, for big checkpoints).

    Returns:
        ``directory``, ``ranks``, ``files``, ``chunks``, ``tensors``, ``values``,
        ``tensor_bytes``, ``checksum`` (algorithm or None), ``encryption``
        (mode or None), ``decrypted`` (True/False for encrypted, else None).

    Raises:
        FileNotFoundError: no ``.metadata`` (never committed).
        IntegrityError: incomplete, truncated, a checksum or CRC mismatch, unparsable.
        DecryptionError: a key for a plaintext checkpoint, a wrong key, tampering.
    """
    ix = read_index(path)
    if key is not None and ix.encryption is None:
        raise DecryptionError(
            f"{ix.path} is not encrypted, but a decryption key was given ({key.source}); an "
            "unencrypted checkpoint where an encrypted one is expected may have been replaced "
            f"(drop --dec-key-file / unset {DEC_KEY_ENV} if plaintext is expected)"
        )
    if require_crc and ix.checksum is None:
        raise IntegrityError(
            f"{ix.path} records no per-chunk checksums (written by stock DCP) and --require-crc "
            "was given"
        )
    _check_tables(ix)
    _check_files(ix)
    total = sum(f.expected_size for f in ix.files.values())
    decrypted = True
    with Progress(os.path.basename(ix.path), total,
                  enabled=progress_enabled(progress, total)) as bar:
        for df in ix.files.values():
            with open(os.path.join(ix.path, df.name), "rb") as f:
                for c in df.chunks:
                    decrypted &= _check_chunk(f, c, ix, key)
                    bar.update(c.length)
    tensors = ix.tensors()
    return {
        "directory": ix.path, "ranks": ix.ranks, "files": len(ix.files), "chunks": len(ix.chunks),
        "tensors": len(tensors), "values": len(ix.values()),
        "tensor_bytes": sum(tensor_bytes(md) for md in tensors.values()),
        "checksum": ix.checksum, "encryption": ix.encryption,
        "decrypted": decrypted if ix.encryption is not None else None,
        "leftovers": len(ix.staging),
    }


def summary_line(s: dict[str, Any]) -> str:
    """The ``OK`` line of ``torchaux verify DIR``."""
    from torchaux.cli.inspect import format_counts

    sums = (f"{s['checksum']} checksums of every chunk verified" if s["checksum"]
            else "no checksums recorded (stock DCP)")
    if s["encryption"] is None:
        enc = "not encrypted" + ("" if s["checksum"] else ", zip CRCs of every chunk verified")
    elif s["decrypted"]:
        enc = f"{s['encryption']}, every chunk decrypted and authenticated"
    else:
        enc = (f"{s['encryption']}, chunks NOT decrypted (no key: stored bytes verified by checksum, "
               f"authentication tags not checked; give --dec-key-file or {DEC_KEY_ENV})")
    ranks = len(s["ranks"])
    return (f"OK {s['directory']}: distributed, {ranks} rank{'' if ranks == 1 else 's'}, "
            f"{s['files']} file{'' if s['files'] == 1 else 's'}, {s['chunks']} chunks; {sums}; {enc}; "
            f"{format_counts(s['tensors'], s['tensor_bytes'], s['values'])}")
