"""``torchaux.load``: torch.load's signature, weights only, every format torchaux writes, in parallel.

One function reads a plain torch.save zip, one with torchaux's content CRC, an
encrypted envelope (AES-GCM, AES-CBC, SM4-CBC) around either plaintext format,
and safetensors, told apart by content (:func:`~torchaux.checkpoint.load.detect_format`).
Storage records are read on several threads straight into preallocated
storages (:mod:`~torchaux.checkpoint.formats.fill`), CRCs are computed while
the bytes are in cache, encrypted chunks are opened on every core and all of
them verified before anything is returned.  Peak memory is the loaded tensors
plus a chunk buffer per thread; a 10 GB file never needs 20 GB.

``load_checkpoint`` reads through the same path (:func:`read_entries`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from torchaux.checkpoint.formats.fill import (
    BufferSource, FileSource, Source, Target, allocate, checksum, fill, storage_view,
)
from torchaux.checkpoint.formats.torch_save.reader import read_zip, unpickle
from torchaux.errors import DecryptionError, IntegrityError, UnsupportedFormatError

__all__ = ["load", "open_source", "read_object", "read_safetensors_entries"]

def _is_path(f: object) -> bool:
    return isinstance(f, (str, os.PathLike))


@contextlib.contextmanager
def open_source(
    f: Any, dec_key: bytes | None = None, dec_mode: str | None = None,
    expected_id: bytes | None = None,
) -> Iterator[tuple[Source, str]]:
    """The plaintext of ``f`` (a path or binary file object) as a fill source, and its name.

    Encrypted files need ``dec_key`` (their header and key are checked here);
    with ``dec_key``, an unencrypted file is refused.  The file stays open
    inside the block.

    Raises:
        IntegrityError: an empty file.  DecryptionError: a key mismatch as above.
    """
    from torchaux.checkpoint.crypto.header import MAGIC

    with contextlib.ExitStack() as stack:
        source: Source
        if _is_path(f):
            name = os.fsdecode(f)
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            stack.callback(os.close, fd)
            source = FileSource(fd, name)
        else:
            name = str(getattr(f, "name", "<file object>"))
            try:
                fd = f.fileno()
                source = FileSource(fd, name, base=f.tell())
            except (AttributeError, OSError, io.UnsupportedOperation):
                data = f.read()
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        "expected a path or a binary file object (open it with 'rb'); got a "
                        f"{type(f).__name__} whose read() returns {type(data).__name__}"
                    ) from None
                fd = -1
                source = BufferSource(data, name)
        if source.size == 0:
            raise IntegrityError(f"checkpoint file {name!r} is empty; it holds no checkpoint")
        head = source.read(0, min(len(MAGIC), source.size))
        if head != MAGIC:
            if dec_key is not None:
                raise DecryptionError(
                    f"{name}: dec_key was given but the file is not encrypted; refusing to load "
                    "an unencrypted file in place of an encrypted one (drop dec_key if this is "
                    "expected)"
                )
            yield source, name
            return
        if dec_key is None:
            raise DecryptionError(f"{name} is encrypted; pass dec_key (and dec_mode) to load it")
        if fd < 0 or isinstance(source, FileSource) and source.base:
            from torchaux.checkpoint.crypto.envelope import decrypt_stream

            plain = io.BytesIO()  # a file object without a descriptor: decrypt as a stream
            decrypt_stream(io.BytesIO(source.read(0, source.size)), plain, dec_key, dec_mode,
                           expected_id=expected_id)
            yield BufferSource(plain.getbuffer(), name), name
            return
        from torchaux.checkpoint.crypto.seekable import EncryptedSource

        yield EncryptedSource(fd, name, dec_key, dec_mode, expected_id), name


def _restore(map_location: Any) -> Any:
    """torch.load's storage mover for ``map_location`` (None: stay on the CPU)."""
    if map_location is None or map_location == "cpu" or map_location == torch.device("cpu"):
        return None
    from torch.serialization import _get_restore_location

    return _get_restore_location(map_location)


def _is_meta(map_location: Any) -> bool:
    from torch.serialization import _is_meta_location

    return bool(_is_meta_location(map_location))


def read_object(
    source: Source, name: str, *, crc_check: bool | None, map_location: Any = None,
    mmap: bool = False, **pickle_load_args: Any,
) -> tuple[Any, bool | None]:
    """Load a torch.save zip from ``source``; ``(object, content CRC verified?)``.

    ``crc_check=None`` checks CRCs when the file records a content CRC
    member.  The second value is True (matched), False (none recorded) or
    None (not checked).
    """
    mapped = torch.UntypedStorage.from_file(name, False, source.size) if mmap else None
    records = read_zip(
        source, name, crc_check=crc_check, data=not _is_meta(map_location), mapped=mapped
    )
    return unpickle(records, map_location, **pickle_load_args), records.crc_verified


def read_safetensors_entries(
    source: Source, name: str, *, crc_check: bool | None, map_location: Any = None,
    mmap: bool = False,
) -> tuple[dict[str, Any], bool | None]:
    """Load a safetensors file from ``source``: tensors plus torchaux's typed values.

    Returns ``(entries, crc_num verified?)`` (None: not checked or none recorded).
    """
    from torchaux.checkpoint.formats.safetensors.metadata import (
        safetensors_entries, verify_safetensors_crcs,
    )
    from torchaux.checkpoint.formats.safetensors.reader import safetensors_layout
    from torchaux.checkpoint.formats.safetensors.writer import CRC_METADATA_KEY

    if sys.byteorder != "little":
        raise UnsupportedFormatError("reading safetensors needs a little-endian host")
    layout, metadata = safetensors_layout(source)
    mapped = torch.UntypedStorage.from_file(name, False, source.size) if mmap else None
    storages, targets = [], []
    for _, _, _, begin, end in layout:
        if mapped is not None:
            storage = mapped[begin:end]
        else:
            storage = allocate(end - begin)
            if end > begin:
                targets.append(Target(begin, storage_view(storage)))
        storages.append(storage)
    fill(source, targets)
    if mapped is not None:
        _touch_starts(storages)
    tensors = {
        tensor_name: torch.empty(0, dtype=dtype).set_(storage).view(dtype).view(shape)
        if storage.nbytes() else torch.empty(shape, dtype=dtype)
        for (tensor_name, dtype, shape, _, _), storage in zip(layout, storages)
    }
    verified = None
    if crc_check or (crc_check is None and CRC_METADATA_KEY in metadata):
        if mapped is not None:  # page the mapping in on every core first
            checksum([storage_view(s) for s in storages])
        verified = verify_safetensors_crcs(tensors, metadata, name)
    out = safetensors_entries(tensors, metadata, name)
    restore = _restore(map_location)
    if restore is not None:
        out = {k: _moved(v, restore) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out, verified


def _touch_starts(storages: list[torch.UntypedStorage]) -> None:
    """Read the first byte of each mapped tensor (a page fault each, not a copy).

    Each fault makes the kernel read the window around it (mmap read-around),
    as torch's and our zip readers do with the member headers.  Without it, a
    cold safetensors mapping was paged in by the user's first touches alone,
    which on this VM (Linux 6.18, ext4) was bimodal: 90-120 ms or 340-500 ms
    for 256 MiB against safetensors.load_file's steady 230-280 ms
    (docs/benchmarks.md section 19).
    """
    for storage in storages:
        if storage.nbytes():
            storage[0]


def _moved(tensor: torch.Tensor, restore: Any) -> torch.Tensor:
    storage = restore(tensor.untyped_storage(), "cpu")
    if isinstance(storage, torch.TypedStorage):
        storage = storage._untyped_storage
    if storage is tensor.untyped_storage():
        return tensor
    out = torch.empty(0, dtype=tensor.dtype, device=storage.device)
    return out.set_(storage, tensor.storage_offset(), tensor.shape, tensor.stride())


def load(
    f: Any,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = True,
    mmap: bool | None = None,
    dec_key: bytes | None = None,
    dec_mode: str | None = None,
    expected_id: str | bytes | None = None,
    crc_check: bool | None = None,
    **pickle_load_args: Any,
) -> Any:
    """``torch.load(f, weights_only=True)`` for every format torchaux writes, in parallel.

    Reads torch.save zips (``save_async``, ``save_checkpoint(format="ckpt")``,
    ``torch.save``), safetensors files (a dict of tensors, plus the values
    ``save_checkpoint`` keeps in the metadata) and torchaux's encrypted files
    of either.  Only weights-only objects load; nothing can run code.

    Args:
        f: a path or a binary file object.
        map_location: as for ``torch.load``.
        pickle_module: must be None (weights-only loading uses torch's own unpickler).
        weights_only: must be True (or None); use ``torch.load`` for anything else.
        mmap: map the file instead of reading it (unencrypted files given by path).
        dec_key, dec_mode, expected_id: key, mode and identity of an encrypted
            file (as for :func:`~torchaux.load_checkpoint`).
        crc_check: None checks the CRCs a file records (content CRC member,
            safetensors ``crc_num``); True also warns when it records none;
            False skips them.

    Raises:
        IntegrityError: damage, truncation or a CRC mismatch.
        DecryptionError: a wrong key, mode or identity, or tampered data.
        pickle.UnpicklingError: an object weights-only loading refuses.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"w": torch.arange(3)}, d + "/m.pt")
        ...     load(d + "/m.pt")
        {'w': tensor([0, 1, 2])}
    """
    if weights_only is not None and weights_only is not True:
        raise ValueError(
            f"torchaux.load always loads weights only (weights_only={weights_only!r} was given); "
            "for a file you trust that holds other objects, use torch.load(f, weights_only=False)"
        )
    if pickle_module is not None:
        raise ValueError(
            "torchaux.load uses torch's weights-only unpickler; pickle_module must be None "
            "(use torch.load for a custom pickle module)"
        )
    for value, what in ((mmap, "mmap"), (crc_check, "crc_check")):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{what} must be a bool or None; got {type(value).__name__}")
    if not _is_path(f) and not callable(getattr(f, "read", None)):
        raise TypeError(f"f must be a path or a binary file object; got {type(f).__name__}")
    expected = None
    if expected_id is not None:
        from torchaux.checkpoint.crypto.header import check_identity

        expected = check_identity(expected_id, "expected_id")
    if dec_key is not None and dec_mode is not None:
        from torchaux.checkpoint.crypto.header import validate_key

        validate_key(dec_key, dec_mode)
    if mmap and not _is_path(f):
        raise ValueError("f must be a file path in order to use the mmap argument")
    with open_source(f, dec_key, dec_mode, expected) as (source, name):
        from torchaux.checkpoint.load import detect_format

        try:
            found = detect_format(source.read(0, min(16, source.size)))
        except IntegrityError:  # not a torchaux format (e.g. a legacy torch.save pickle)
            if dec_key is not None:
                raise
            found = "other"
        if mmap and dec_key is not None:
            raise ValueError(
                "mmap=True maps the file's bytes, but an encrypted file must be decrypted; "
                "load it with mmap=False"
            )
        if found == "safetensors":
            obj, verified = read_safetensors_entries(
                source, name, crc_check=crc_check, map_location=map_location, mmap=bool(mmap)
            )
            if crc_check and verified is None:
                warnings.warn(f"{name} records no crc_num; nothing to check", stacklevel=2)
            return obj
        if found == "other":
            if not _is_path(f):  # torch.load reads it again, from memory
                f = io.BytesIO(source.read(0, source.size))
            return torch.load(f, map_location, weights_only=True, mmap=mmap, **pickle_load_args)
        obj, verified = read_object(
            source, name, crc_check=crc_check, map_location=map_location, mmap=bool(mmap),
            **pickle_load_args,
        )
        if crc_check and verified is False:
            warnings.warn(
                f"{name} has no content CRC (saved without crc_check); its member CRCs were "
                "verified instead", stacklevel=2,
            )
        return obj

