"""``save_checkpoint``: MindSpore's checkpoint features on the save_async engine.

Encryption (AES-GCM, AES-CBC, SM4-CBC; :mod:`.crypto`), a CRC
(:mod:`.integrity` for ``.ckpt``, MindSpore's ``crc_num`` metadata for
safetensors), entry filtering, extra metadata and safetensors output - staged
on the caller like :func:`torchaux.save_async` and written, encrypted and
committed in the background, so a secure save stalls training no more than a
plain one.  What MindSpore gets wrong and this does not (mindspore-spec.md
§9, §10.2): every argument, key length and mode is checked before any I/O;
type errors are ``TypeError``; the old file survives a failed save (temp
file, fsync, rename); CRC and encryption combine; CBC modes are authenticated;
background failures reach the caller through the returned handle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
from collections.abc import Callable, Mapping
from typing import IO, Any

import torch

from torchaux import _knobs
from torchaux.checkpoint import integrated
from torchaux.checkpoint.engine import staging
from torchaux.checkpoint.api import _check_target
from torchaux.checkpoint.crypto.header import check_identity
from torchaux.checkpoint.storage import remote
from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.formats.torch_save.writer import archive_name_for, write_torch_save
from torchaux.checkpoint.formats.safetensors.metadata import (
    APPEND_METADATA_KEY,
    HEADER_CRC_KEY,
    header_crc,
)
from torchaux.checkpoint.named import Value, check_append_dict, collect_named
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle, default_saver

__all__ = [
    "save_checkpoint", "WriteSpec", "header_crc", "FORMATS", "ENC_MODES",
    "APPEND_METADATA_KEY", "HEADER_CRC_KEY",
]

FORMATS = ("ckpt", "safetensors")
ENC_MODES = ("AES-GCM", "AES-CBC", "SM4-CBC")
_ASYNC = {False: None, True: "thread", "thread": "thread", "process": "process"}
_KWARGS = {"remove_redundancy", "file_mode", "saver", "enc_aad", "storage_options"}
_DEFAULT_FILE_MODE = 0o600


def _check_flags(
    integrated_save: object, async_save: object, crc_check: object, format: object
) -> str | None:
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
    if not isinstance(integrated_save, bool):
        raise TypeError(f"integrated_save must be a bool; got {type(integrated_save).__name__}")
    if not isinstance(async_save, (bool, str)):
        raise TypeError(
            f"async_save must be a bool, 'thread' or 'process'; got {type(async_save).__name__}"
        )
    if async_save not in _ASYNC:
        raise ValueError(f"async_save must be False, True, 'thread' or 'process'; got {async_save!r}")
    if not isinstance(crc_check, bool):
        raise TypeError(f"crc_check must be a bool; got {type(crc_check).__name__}")
    return _ASYNC[async_save]


def _check_kwargs(
    kwargs: Mapping[str, Any],
) -> tuple[int, bool | None, AsyncSaver | None, bytes | None]:
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        # MindSpore silently ignores unknown keywords; a typo then changes nothing.
        raise TypeError(
            f"save_checkpoint got unexpected keyword argument(s) {unknown}; "
            f"supported: {sorted(_KWARGS)}"
        )
    file_mode = kwargs.get("file_mode", _DEFAULT_FILE_MODE)
    if isinstance(file_mode, bool) or not isinstance(file_mode, int) or not 0 <= file_mode <= 0o777:
        raise ValueError(f"file_mode must be permission bits like 0o600; got {file_mode!r}")
    redundancy = kwargs.get("remove_redundancy")
    if redundancy is not None and not isinstance(redundancy, bool):
        raise TypeError(f"remove_redundancy must be a bool or None; got {redundancy!r}")
    saver = kwargs.get("saver")
    if saver is not None and not isinstance(saver, AsyncSaver):
        raise TypeError(f"saver must be an AsyncSaver or None; got {type(saver).__name__}")
    enc_aad = kwargs.get("enc_aad")
    return file_mode, redundancy, saver, None if enc_aad is None else check_identity(enc_aad, "enc_aad")


def _checkpoint_target(name: str | os.PathLike[str]) -> str:
    """The absolute target path; a symlink there is kept as the path, never followed.

    ``save_async`` follows a link at its target as torch.save does; here the
    commit's ``os.replace`` replaces the link itself, so a link planted in a
    shared directory cannot redirect a checkpoint onto another file (security
    review, issue #16 item 1; docs/SECURITY.md).
    """
    path = os.path.abspath(os.fsdecode(name))
    if path and os.path.islink(path):
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ValueError(
                f"save_checkpoint target directory {parent!r} does not exist; create it first"
            )
        return os.path.join(os.path.realpath(parent), os.path.basename(path))
    resolved = _check_target(name, "save_checkpoint")
    assert resolved is not None  # a str/PathLike target always yields a path
    return resolved


def _check_encryption(enc_key: object, enc_mode: object) -> None:
    if enc_key is None:
        if not isinstance(enc_mode, str):
            raise TypeError(f"enc_mode must be a str; got {type(enc_mode).__name__}")
        return
    from torchaux.checkpoint.crypto.header import validate_key  # needs no 'cryptography'

    validate_key(enc_key, enc_mode)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ImportError(
            "encrypted checkpoints need the 'cryptography' package: "
            "pip install 'torchaux[encryption]'"
        ) from None


def _safetensors_parts(
    named: Mapping[str, Value], redundancy: bool | None, crc_check: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from torchaux.checkpoint.formats.safetensors.writer import (
        check_safetensors_dtypes,
        check_safetensors_metadata,
    )

    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    check_safetensors_dtypes(tensors)
    values = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)}
    metadata = {"format": "pt"}
    if values:
        metadata[APPEND_METADATA_KEY] = json.dumps(values, sort_keys=True)
    if redundancy is not None:
        metadata["remove_redundancy"] = str(redundancy)
    if crc_check:
        metadata[HEADER_CRC_KEY] = header_crc(tensors, metadata)
    check_safetensors_metadata(metadata)
    return tensors, metadata


@dataclasses.dataclass(frozen=True)
class WriteSpec:
    """How to write one staged checkpoint; picklable, so a writer process can run it.

    Its ``repr`` (and so that of every job holding it, in any log or
    traceback) never shows the key, only its length:

    >>> WriteSpec("ckpt", "/x.ckpt", atomic_write, b"k" * 16, "AES-GCM", False, [], {})
    WriteSpec(format='ckpt', path='/x.ckpt', enc_key=<128-bit key hidden>, enc_mode='AES-GCM', \
crc_check=False, enc_aad=None)
    """

    format: str
    path: str
    sink: Callable[[str], Any]
    enc_key: bytes | None = dataclasses.field(repr=False)
    enc_mode: str
    crc_check: bool
    names: list[str]
    metadata: dict[str, str]
    enc_aad: bytes | None = None

    def __repr__(self) -> str:
        key = "None" if self.enc_key is None else f"<{8 * len(self.enc_key)}-bit key hidden>"
        return (
            f"WriteSpec(format={self.format!r}, path={self.path!r}, enc_key={key}, "
            f"enc_mode={self.enc_mode!r}, crc_check={self.crc_check!r}, enc_aad={self.enc_aad!r})"
        )

    __str__ = __repr__

    def _write_plain(self, snap: staging.Snapshot, out: IO[bytes]) -> None:
        if self.format == "ckpt":
            write_torch_save(
                snap, out, archive_name=archive_name_for(self.path), content_crc=self.crc_check
            )
        else:
            from torchaux.checkpoint.formats.safetensors.writer import write_safetensors

            write_safetensors(snap, out, self.names, self.metadata, crc=self.crc_check)

    def __call__(self, snap: staging.Snapshot) -> str:
        with self.sink(self.path) as out:
            if self.enc_key is None:
                self._write_plain(snap, out)
            else:
                from torchaux.checkpoint.crypto.envelope import EncryptingWriter

                # Staged buffers stay unchanged until the write ends (the snapshot
                # is released only afterwards), so the cipher may read them lazily.
                with EncryptingWriter(
                    out, self.enc_key, self.enc_mode,
                    chunk_size=_knobs.encryption_chunk_bytes(),
                    workers=_knobs.encryption_workers(), stable_buffers=True,
                    identity=self.enc_aad,
                ) as enc:
                    self._write_plain(snap, enc)  # type: ignore[arg-type]
        return self.path


def save_checkpoint(
    save_obj: torch.nn.Module | Mapping[str, Any] | list[Any],
    ckpt_file_name: str | os.PathLike[str],
    integrated_save: bool = True,
    async_save: bool | str = False,
    append_dict: Mapping[str, Any] | None = None,
    enc_key: bytes | None = None,
    enc_mode: str = "AES-GCM",
    choice_func: Callable[[str], bool] | None = None,
    crc_check: bool = False,
    format: str = "ckpt",
    **kwargs: Any,
) -> SaveHandle:
    """Save named tensors (and extra values) as a checkpoint, optionally encrypted.

    Args:
        save_obj: an ``nn.Module`` (its ``state_dict()``), a dict of name to
            tensor/int/float/bool/str (e.g. what :func:`load_checkpoint` returns),
            or a list of tensors, ``(name, tensor)`` pairs or ``{"name", "data"}``
            dicts.
        ckpt_file_name: the file to write (used as given; no extension added).
        integrated_save: what to do with DTensor entries (FSDP2, tensor
            parallel; :mod:`torchaux.checkpoint.integrated`).  ``True``
            (default, as MindSpore): every rank of their mesh calls; the full
            tensors are gathered and the mesh's lowest rank writes one
            ordinary file; the others write nothing and their handles resolve
            once it is committed (or raise its error).  ``False``: every rank
            writes its local shards to the file name it passes.  A state
            without DTensors (so always without a process group) is saved as
            given either way.
        async_save: ``False`` (return once durable), ``True``/``"thread"``
            (background thread), or ``"process"`` (background process).
        append_dict: extra ``str`` -> int/float/bool/str/tensor entries, saved
            after the others (unfiltered).
        enc_key: ``bytes`` key (AES: 16, 24 or 32 bytes; SM4: 16) or ``None``.
        enc_mode: ``"AES-GCM"``, ``"AES-CBC"`` or ``"SM4-CBC"``.
        choice_func: ``name -> bool``; only names it accepts are saved.
        crc_check: record a CRC-32 that :func:`load_checkpoint` checks.
        format: ``"ckpt"`` (torch.save zip, loads with ``torch.load``) or
            ``"safetensors"`` (loads with ``safetensors.torch.load_file``).
        **kwargs: ``storage_options`` (fsspec options for an ``s3://`` URL
            ``ckpt_file_name``), ``file_mode`` (default ``0o600``), ``remove_redundancy``
            (written to safetensors metadata), ``saver`` (an AsyncSaver) and
            ``enc_aad`` (``str``/``bytes``, at most 1024 bytes, needs
            ``enc_key``): the checkpoint's identity, e.g. ``"run7/step1200"``,
            stored in the authenticated header (envelope version 2, visible
            without the key) and checked by ``load_checkpoint(...,
            expected_id=...)``, so a file swapped for or rolled back to another
            one under the same key is refused.

    A symlink at ``ckpt_file_name`` is replaced by the new file, never
    written through (``save_async`` follows it, as ``torch.save`` does).

    Returns:
        A :class:`SaveHandle`, already committed unless ``async_save``.

    Raises:
        TypeError, ValueError: bad arguments, before any I/O.
        Exception: a synchronous save re-raises what the writer raised.

    Example:
        >>> import os, torch, torchaux
        >>> path = os.path.join(doctest_tmp, "net.ckpt")
        >>> net = torch.nn.Linear(4, 2)
        >>> _ = torchaux.save_checkpoint(net, path, append_dict={"epoch": 3},
        ...                              enc_key=bytes(16), crc_check=True)
        >>> sorted(torchaux.load_checkpoint(path, dec_key=bytes(16), crc_check=True))
        ['bias', 'epoch', 'weight']
    """
    mode = _check_flags(integrated_save, async_save, crc_check, format)
    file_mode, redundancy, saver, enc_aad = _check_kwargs(kwargs)
    if not isinstance(ckpt_file_name, (str, os.PathLike)):
        raise TypeError(
            f"ckpt_file_name must be a str or os.PathLike path; got {type(ckpt_file_name).__name__}"
        )
    _check_encryption(enc_key, enc_mode)
    if enc_aad is not None and enc_key is None:
        raise ValueError(
            "enc_aad binds a checkpoint identity into the encrypted header; it needs enc_key "
            "(a plaintext file has no authenticated header to hold it)"
        )
    named = collect_named(save_obj, choice_func, check_append_dict(append_dict))
    checked = (file_mode, redundancy, saver, enc_aad)
    args = (enc_key, enc_mode, crc_check, format, kwargs, checked)
    if not integrated.has_dtensors(named):
        return _save_named(named, ckpt_file_name, mode, *args)
    if not integrated_save:
        return _save_named(integrated.local_shards(named), ckpt_file_name, mode, *args)
    full, coord = integrated.gather(named)  # a collective on every rank of the mesh
    target = integrated.target_of(ckpt_file_name)
    if full is None:
        return coord.follow(target, wait=mode is None)
    try:
        # Waited below, after the outcome callback is in place.
        handle = _save_named(full, ckpt_file_name, mode or "thread", *args)
    except BaseException as exc:
        coord.fail(exc, target)
        raise
    coord.announce(handle, target)
    if mode is None:
        handle.wait()
    return handle


def _save_named(
    named: Mapping[str, Value],
    ckpt_file_name: str | os.PathLike[str],
    mode: str | None,
    enc_key: bytes | None,
    enc_mode: str,
    crc_check: bool,
    format: str,
    kwargs: Mapping[str, Any],
    checked: tuple[int, bool | None, AsyncSaver | None, bytes | None],
) -> SaveHandle:
    """Write ``named`` (validated entries) to ``ckpt_file_name``: the path of one file."""
    file_mode, redundancy, saver, enc_aad = checked
    storage_options = kwargs.get("storage_options")
    if remote.is_url(ckpt_file_name) or storage_options is not None:
        if mode == "process":
            raise ValueError("async_save='process' writes local files only; use True for a URL")
        path = _check_target(ckpt_file_name, "save_checkpoint", storage_options)
    else:
        path = _checkpoint_target(ckpt_file_name)
    if format == "safetensors":
        tensors, metadata = _safetensors_parts(named, redundancy, crc_check)
        obj: dict[str, Any] = tensors
        names = list(tensors)
    else:
        obj, metadata, names = dict(named), {}, []
    if mode == "process":
        from torchaux.checkpoint.engine.process_saver import ProcessSaver, default_process_saver

        if saver is not None and not isinstance(saver, ProcessSaver):
            raise ValueError(
                "async_save='process' needs a ProcessSaver (or no saver=); got a thread "
                f"{type(saver).__name__}, which would silently write on a thread"
            )
        saver = saver or default_process_saver()
    saver = saver or default_saver()
    sink = saver.sink
    if remote.is_url(path):
        sink = remote.sink_for(path, sink, storage_options)
    elif sink is atomic_write:
        sink = functools.partial(atomic_write, mode=file_mode)
    write = WriteSpec(format, path, sink, enc_key, enc_mode, crc_check, names, metadata, enc_aad)
    saver.reserve()
    try:
        snapshot = staging.stage(
            obj, pool=saver.pool, pickle_module=pickle, pickle_protocol=2,
            index=obj if format == "safetensors" else None,
            # zip records' CRCs during the copy; a writer process computes its own
            crc32=format != "safetensors" and mode != "process",
        )
    except BaseException:
        saver.cancel_reservation()
        raise
    handle = saver.submit(snapshot, write, path)
    if mode is None:
        handle.wait()
    return handle
