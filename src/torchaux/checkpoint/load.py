"""``load_checkpoint`` and ``load_param_into_net``: the reading half of secure checkpoints.

The format is detected from the content, never the file name: an encrypted
envelope (:mod:`.crypto`), a torch.save zip, or safetensors.  Nothing is ever
unpickled beyond torch's weights-only unpickler, so a checkpoint cannot run
code.  Files are read by the parallel loader (:mod:`torchaux.checkpoint.loader`):
records straight into the tensors, CRCs while reading, every encrypted chunk
verified before any entry is returned; with ``dec_key`` given, a file that is
*not* encrypted is refused (a plaintext file where an encrypted one is
expected means it was replaced).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchaux.checkpoint.formats.fill import BufferSource
from torchaux.checkpoint.formats.torch_save import integrity
from torchaux.checkpoint.loader import open_source, read_object, read_safetensors_entries
from torchaux.checkpoint.crypto.header import MAGIC as _ENC_MAGIC
from torchaux.checkpoint.formats.safetensors.metadata import (
    safetensors_entries,
    verify_safetensors_crcs,
)
from torchaux.checkpoint.save import FORMATS
from torchaux.checkpoint.storage import remote
from torchaux.errors import DecryptionError, IntegrityError

__all__ = [
    "load_checkpoint", "load_param_into_net", "detect_format", "torch_entries",
    "safetensors_entries", "verify_safetensors_crcs",
]

_ZIP_MAGIC = b"PK\x03\x04"
# Longest quote of file content in an error message (always with !r).
_QUOTE = 80


def _prefixes(value: object, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be None, a str or a list/tuple of str; got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty; pass None to disable it")
    for p in value:
        if not isinstance(p, str):
            raise TypeError(f"{name} entries must be str; got {type(p).__name__}")
        if p == "":
            raise ValueError(f"{name} entries must be non-empty strings")
    return tuple(value)


def detect_format(head: bytes) -> str:
    """Name the content: ``"encrypted"``, ``"ckpt"`` or ``"safetensors"``.

    >>> detect_format(b"PK\\x03\\x04" + bytes(8))
    'ckpt'
    """
    if head.startswith(_ENC_MAGIC):
        return "encrypted"
    if head.startswith(_ZIP_MAGIC):
        return "ckpt"
    from torchaux.checkpoint.formats.safetensors.writer import sniff_safetensors

    if sniff_safetensors(head):
        return "safetensors"
    raise IntegrityError(
        "expected a torchaux/torch.save checkpoint (zip), a safetensors file or an encrypted "
        f"torchaux file; found neither (first bytes {head[:8]!r}); is it the right file?"
    )


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def _read_plain(
    path: str, dec_key: bytes | None, dec_mode: str | None, expected_id: bytes | None = None,
    storage_options: dict[str, Any] | None = None,
) -> bytes:
    with (remote.open_for_read(path, storage_options) if remote.is_url(path) else open(path, "rb")) as f:
        head = f.read(16)
        f.seek(0)
        if not head:
            raise IntegrityError(f"checkpoint file {path!r} is empty; it holds no checkpoint")
        if detect_format(head) != "encrypted":
            if dec_key is not None:
                raise DecryptionError(
                    f"{path}: dec_key was given but the file is not encrypted; refusing to load "
                    "an unencrypted file in place of an encrypted one (drop dec_key if this is "
                    "expected)"
                )
            return f.read()
        if dec_key is None:
            raise DecryptionError(
                f"{path} is encrypted; pass dec_key (and dec_mode) to load it"
            )
        from torchaux.checkpoint.crypto.envelope import decrypt_stream

        out = io.BytesIO()
        decrypt_stream(f, out, dec_key, dec_mode, expected_id=expected_id)
        return out.getvalue()


def torch_entries(data: bytes, path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a save_checkpoint ``.ckpt``; damage -> IntegrityError.

    The zip layout is checked first (:func:`~torchaux.checkpoint.formats.torch_save.integrity.check_members`):
    a compressed member is refused before torch's reader would inflate it.
    """
    integrity.check_members(data, path)
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except IntegrityError:
        raise
    except Exception as exc:  # a damaged pickle or zip fails torch.load in many ways
        first = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run on
        raise IntegrityError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {_quote(first)}); the file is "
            "damaged, truncated or not a weights-only torch.save file"
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise IntegrityError(
            f"{path}: expected a dict of name -> value (what save_checkpoint writes), found "
            f"{type(obj).__name__}; use torch.load for other torch.save files"
        )
    return obj


def _read_entries(
    path: str, dec_key: bytes | None, dec_mode: str | None, expected_id: bytes | None,
    options: dict[str, Any] | None, crc_check: bool, format: str | None, map_location: Any,
) -> dict[str, Any]:
    """Read the file through the parallel loader (:mod:`.loader`); remote files whole first."""
    with contextlib.ExitStack() as stack:
        if remote.is_url(path):
            data = _read_plain(path, dec_key, dec_mode, expected_id, options)
            source: Any = BufferSource(data, path)
        else:
            source, _ = stack.enter_context(open_source(path, dec_key, dec_mode, expected_id))
        found = detect_format(source.read(0, min(16, source.size)))
        if format is not None and found != format:
            raise ValueError(f"{path} is a {found!r} checkpoint, but format={format!r} was requested")
        if found == "safetensors":
            entries, verified = read_safetensors_entries(
                source, path, crc_check=crc_check, map_location=map_location
            )
            if crc_check and verified is None:
                warnings.warn(f"{path} records no crc_num; nothing to check", stacklevel=4)
            return entries
        try:
            obj, verified = read_object(source, path, crc_check=crc_check, map_location=map_location)
        except IntegrityError:
            raise
        except Exception as exc:  # a damaged pickle fails the unpickler in many ways
            first = (str(exc).strip().splitlines() or [""])[0]
            raise IntegrityError(
                f"{path}: not a readable checkpoint ({type(exc).__name__}: {_quote(first)}); the "
                "file is damaged, truncated or not a weights-only torch.save file"
            ) from exc
    if crc_check and verified is False:
        warnings.warn(
            f"{path} has no content CRC (saved without crc_check); its member CRCs were "
            "verified instead", stacklevel=4,
        )
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise IntegrityError(
            f"{path}: expected a dict of name -> value (what save_checkpoint writes), found "
            f"{type(obj).__name__}; use torch.load for other torch.save files"
        )
    return obj


def load_checkpoint(
    ckpt_file_name: str | os.PathLike[str],
    net: torch.nn.Module | None = None,
    strict_load: bool = False,
    filter_prefix: str | Sequence[str] | None = None,
    dec_key: bytes | None = None,
    dec_mode: str | None = "AES-GCM",
    specify_prefix: str | Sequence[str] | None = None,
    choice_func: Callable[[str], bool] | None = None,
    crc_check: bool = False,
    format: str | None = None,
    map_location: Any = "cpu",
    expected_id: str | bytes | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any name -> tensor torch.save file).

    Args:
        ckpt_file_name: the file.
        net: if given, the loaded entries are copied into it with
            :func:`load_param_into_net` (``strict_load`` applies).
        strict_load: see :func:`load_param_into_net`.
        filter_prefix: drop names starting with any of these prefixes.
        dec_key, dec_mode: key and mode of an encrypted file (the mode is also
            recorded in the file; a mismatch raises :class:`DecryptionError`;
            ``dec_mode=None`` accepts the mode the file records).
        specify_prefix: keep only names starting with one of these prefixes.
        choice_func: ``name -> bool``; consulted only when neither prefix
            argument is given (MindSpore's rule).
        crc_check: verify the CRC recorded at save time.
        format: ``None`` (detect), ``"ckpt"`` or ``"safetensors"``; a file of
            another format raises ``ValueError``.
        map_location: where tensors go, as for ``torch.load`` (default CPU).
        expected_id: the identity the file was saved with
            (``save_checkpoint(..., enc_aad=...)``); needs ``dec_key``.  A file
            with another identity, or none (a version-1 file), raises
            :class:`~torchaux.DecryptionError`: it was swapped or rolled back.
        storage_options: fsspec options when ``ckpt_file_name`` is a URL
            such as ``"s3://bucket/net.ckpt"``.

    Returns:
        ``name -> tensor`` (plus int/float/bool/str entries saved via ``append_dict``).

    Raises:
        TypeError: a non-path file name or wrongly typed argument.
        ValueError: missing or empty file, nothing left after filtering, a
            format mismatch; :class:`~torchaux.IntegrityError` (a
            ``ValueError``) for damage, :class:`~torchaux.DecryptionError` for
            a wrong key, wrong mode or tampering.
    """
    if not isinstance(ckpt_file_name, (str, os.PathLike)):
        raise TypeError(
            f"ckpt_file_name must be a str or os.PathLike path; got {type(ckpt_file_name).__name__}"
        )
    specify = _prefixes(specify_prefix, "specify_prefix")
    filters = _prefixes(filter_prefix, "filter_prefix")
    if choice_func is not None and not callable(choice_func):
        raise TypeError(f"choice_func must be callable or None; got {type(choice_func).__name__}")
    if dec_key is not None and dec_mode is not None:
        from torchaux.checkpoint.crypto.header import validate_key

        validate_key(dec_key, dec_mode)
    elif dec_key is not None and not isinstance(dec_key, bytes):
        raise TypeError(f"dec_key must be bytes; got {type(dec_key).__name__}")
    elif dec_mode is not None and not isinstance(dec_mode, str):
        raise TypeError(f"dec_mode must be a str or None; got {type(dec_mode).__name__}")
    if not isinstance(crc_check, bool):
        raise TypeError(f"crc_check must be a bool; got {type(crc_check).__name__}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be None (detect), 'ckpt' or 'safetensors'; got {format!r}")
    expected = None
    if expected_id is not None:
        from torchaux.checkpoint.crypto.header import check_identity

        expected = check_identity(expected_id, "expected_id")
        if dec_key is None:
            raise ValueError(
                "expected_id is checked against the encrypted header; it needs dec_key "
                "(a plaintext file carries no authenticated identity)"
            )
    options = remote.check_storage_options(storage_options, ckpt_file_name) or None
    if remote.is_url(ckpt_file_name):  # read by storage/remote.py; missing -> ValueError
        path = str(ckpt_file_name)
    else:
        path = os.path.realpath(os.fsdecode(ckpt_file_name))
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint file {path!r} does not exist (or is not a file)")
    entries = _read_entries(path, dec_key, dec_mode, expected, options, crc_check, format,
                            map_location)
    try:
        if specify is not None or filters is not None:
            entries = {
                k: v for k, v in entries.items()
                if (specify is None or k.startswith(specify))
                and (filters is None or not k.startswith(filters))
            }
        elif choice_func is not None:
            entries = {k: v for k, v in entries.items() if choice_func(k)}
    except Exception as exc:
        raise ValueError(f"choice_func raised {type(exc).__name__}: {exc}") from exc
    if not entries:
        raise ValueError(
            f"{path}: no entries left after filtering (specify_prefix={specify}, "
            f"filter_prefix={filters}, choice_func={choice_func}); loosen the filter"
        )
    if net is not None:
        load_param_into_net(net, entries, strict_load)
    return entries


_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_INTS = {torch.int8, torch.int16, torch.int32, torch.int64}


def _convert(name: str, value: torch.Tensor, target: torch.Tensor, strict: bool) -> torch.Tensor:
    shape = tuple(value.shape)
    want = tuple(target.shape)
    if shape != want:
        # MindSpore accepts extra trailing 1-dims, e.g. (12, 2048, 1, 1) for (12, 2048).
        if len(shape) > len(want) and shape[: len(want)] == want and all(d == 1 for d in shape[len(want):]):
            value = value.reshape(want)
        else:
            raise RuntimeError(
                f"{name}: checkpoint shape {shape} does not match the network's {want}; "
                "check that the checkpoint belongs to this model"
            )
    if value.dtype != target.dtype:
        same_kind = {value.dtype, target.dtype} <= _FLOATS or {value.dtype, target.dtype} <= _INTS
        if strict or not same_kind:
            raise RuntimeError(
                f"{name}: checkpoint dtype {value.dtype} does not match the network's "
                f"{target.dtype}" + ("" if strict else "; only float<->float and int<->int convert")
            )
        warnings.warn(f"{name}: converting {value.dtype} to {target.dtype}", stacklevel=4)
        value = value.to(target.dtype)
    return value


def load_param_into_net(
    net: torch.nn.Module, parameter_dict: Mapping[str, Any], strict_load: bool = False
) -> tuple[list[str], list[str]]:
    """Copy checkpoint entries into ``net``'s parameters and buffers, in place.

    Shapes must match (extra trailing 1-dims are squeezed); dtypes must match,
    except that without ``strict_load`` floats convert to floats and ints to
    ints, with a warning.  Without ``strict_load``, a name prefix the
    checkpoint adds (``"backbone."`` from a wrapper model) is found and removed.

    Returns:
        ``(param_not_load, ckpt_not_load)``: network names that got nothing,
        and checkpoint names that were not used.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> load_param_into_net(net, {"weight": torch.ones(1, 2), "epoch": 3})
        (['bias'], ['epoch'])
        >>> net.weight.tolist()
        [[1.0, 1.0]]
    """
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
    if not isinstance(parameter_dict, Mapping):
        raise TypeError(f"parameter_dict must be a dict; got {type(parameter_dict).__name__}")
    if not isinstance(strict_load, bool):
        raise TypeError(f"strict_load must be a bool; got {type(strict_load).__name__}")
    for k, v in parameter_dict.items():
        if not isinstance(k, str) or not isinstance(v, (torch.Tensor, int, float, bool, str)):
            raise TypeError(
                f"parameter_dict must map str to tensors (or int/float/bool/str); got "
                f"{type(k).__name__} -> {type(v).__name__} for {k!r}"
            )
    targets = dict(net.state_dict(keep_vars=True))
    unused = [k for k in parameter_dict]
    missing: list[str] = []
    pending = {}
    for name, target in targets.items():
        value = parameter_dict.get(name)
        if isinstance(value, torch.Tensor):
            pending[name] = _convert(name, value, target, strict_load)
            unused.remove(name)
        else:
            missing.append(name)
    while missing and not strict_load:
        # A wrapper's prefix ("backbone.") explains the most missing names at once.
        candidates = {
            key[: -len(name)] for name in missing for key in unused if key.endswith("." + name)
        }
        best = max(
            candidates, default=None,
            key=lambda p: (sum(isinstance(parameter_dict.get(p + n), torch.Tensor) for n in missing), p),
        )
        found = [n for n in missing if best is not None and isinstance(parameter_dict.get(best + n), torch.Tensor)]
        if not found:
            break
        for name in found:
            pending[name] = _convert(name, parameter_dict[best + name], targets[name], strict_load)
            unused.remove(best + name)
            missing.remove(name)
    with torch.no_grad():
        for name, value in pending.items():
            targets[name].copy_(value)
    return missing, unused
