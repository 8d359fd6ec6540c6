"""What torchaux keeps in safetensors metadata: typed values and the header CRC.

``save_checkpoint(format="safetensors")`` stores the non-tensor entries of
``append_dict`` as JSON under :data:`APPEND_METADATA_KEY` and, with
``crc_check=True``, MindSpore's ``crc_num`` plus :data:`HEADER_CRC_KEY`, a
CRC-32 of what ``crc_num`` does not cover (names, dtypes, shapes, other
metadata).  Reading treats the metadata as data, never structure: values
only add int/float/bool/str entries and never replace a tensor, and a
torchaux file whose header CRC was stripped is refused under ``crc_check``
(security review, issue #16 item 6; docs/FORMAT.md §3.2).
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from torchaux.checkpoint.formats.safetensors.writer import CRC_METADATA_KEY, verify_crc
from torchaux.errors import IntegrityError

__all__ = [
    "APPEND_METADATA_KEY", "HEADER_CRC_KEY", "header_crc", "verify_safetensors_crcs",
    "safetensors_entries",
]

#: safetensors metadata key holding non-tensor entries as JSON (types preserved).
APPEND_METADATA_KEY = "torchaux.values"
#: safetensors metadata key: CRC-32 of names, dtypes, shapes and other metadata.
#: MindSpore's ``crc_num`` covers only names and tensor bytes, so a changed
#: dtype or value in the header would still pass; this closes that gap.
HEADER_CRC_KEY = "torchaux.header_crc32"
#: MindSpore's safetensors files say ``"format": "ms"`` and record ``crc_num``
#: without torchaux's header CRC (mindspore-spec.md §5); any other file with
#: ``crc_num`` was written by torchaux, which always writes both.
_MINDSPORE_FORMAT = "ms"
# Longest quote of file content in an error message (always with !r).
_QUOTE = 80


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[:_QUOTE] + "...")


def header_crc(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """CRC-32 (8 hex digits) of tensor names/dtypes/shapes and the other metadata.

    The CRC entries themselves are left out, so reader and writer agree.

    >>> header_crc({"w": torch.zeros(2)}, {"format": "pt"})
    '0a683a29'
    """
    doc = {
        "tensors": sorted([k, str(v.dtype), list(v.shape)] for k, v in tensors.items()),
        "metadata": {k: v for k, v in metadata.items() if k not in (HEADER_CRC_KEY, "crc_num")},
    }
    return f"{zlib.crc32(json.dumps(doc, sort_keys=True).encode()):08x}"


def verify_safetensors_crcs(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str
) -> bool | None:
    """Check the header CRC and ``crc_num`` a safetensors file records.

    Returns:
        True if ``crc_num`` was present and matched, None if the file records none.

    Raises:
        IntegrityError: either CRC does not match.
    """
    stored = metadata.get(HEADER_CRC_KEY)
    if stored is None and CRC_METADATA_KEY in metadata:
        if metadata.get("format") != _MINDSPORE_FORMAT:
            # torchaux writes both CRCs; without the header CRC a changed dtype,
            # shape or value would pass crc_num (security review, issue #16 item 6).
            raise IntegrityError(
                f"{path}: records crc_num but not {HEADER_CRC_KEY!r}, which torchaux always "
                "writes with it; the header CRC was removed, so dtypes, shapes and metadata "
                "cannot be trusted"
            )
        warnings.warn(
            f"{path}: a MindSpore safetensors file (crc_num only): its dtypes, shapes and "
            "metadata are not covered by a CRC", stacklevel=4,
        )
    if stored is not None and stored != header_crc(tensors, metadata):
        raise IntegrityError(
            f"{path}: the header CRC does not match: names, dtypes, shapes or metadata "
            "were changed after saving"
        )
    ok = verify_crc(tensors, metadata)
    if ok is False:
        raise IntegrityError(
            f"{path}: the crc check failed: the tensors do not match the recorded crc_num; "
            "the file is damaged"
        )
    return ok



def safetensors_entries(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str
) -> dict[str, Any]:
    """Tensors plus the typed non-tensor values ``save_checkpoint`` kept in the metadata.

    The values are data, never structure: a JSON object of names that are not
    tensor names to int, float, bool or str (the types ``append_dict`` takes).

    Raises:
        IntegrityError: the metadata is not such an object.

    Example:
        >>> safetensors_entries({}, {"torchaux.values": '{"epoch": 3}'}, "f")
        {'epoch': 3}
        >>> safetensors_entries({}, {"torchaux.values": '{"x": [1]}'}, "f")
        Traceback (most recent call last):
        torchaux.errors.IntegrityError: f: 'torchaux.values' entry 'x' is a list; ...
    """
    out: dict[str, Any] = dict(tensors)
    if APPEND_METADATA_KEY not in metadata:
        return out
    where = f"{path}: {APPEND_METADATA_KEY!r}"
    try:
        values = json.loads(metadata[APPEND_METADATA_KEY])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; int digit limit
        raise IntegrityError(f"{where} metadata is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(values, dict):
        raise IntegrityError(
            f"{where} metadata must be a JSON object of name -> value; found a "
            f"{type(values).__name__}: the file is damaged or was crafted"
        )
    for name, value in values.items():
        if name in tensors:
            raise IntegrityError(
                f"{where} entry {_quote(name)} has the name of a tensor; values only add "
                "entries, never replace tensors: the file was crafted"
            )
        if not isinstance(value, (bool, int, float, str)):
            raise IntegrityError(
                f"{where} entry {_quote(name)} is a {type(value).__name__}; only int, float, "
                "bool and str are saved there: the file is damaged or was crafted"
            )
        out[name] = value
    return out
