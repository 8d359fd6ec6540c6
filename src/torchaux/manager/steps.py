"""Step naming, validation and metadata: what one manager step looks like in storage.

A step lives under ``<directory>/step-<N>/`` and holds the state file
(:data:`STATE_NAME`) - or, for a step saved by every rank of a process group
(layout :data:`LAYOUT_SHARDED`), a :mod:`torchaux.distributed` checkpoint
(``.metadata`` and one data file per rank) - and the metadata file
(:data:`METADATA_NAME`, JSON with the step number, its metrics and layout).  The metadata file is the commit marker: it
is written last (on object stores, where there is no atomic rename) or inside
the temp directory that is renamed into place (local disks), so a step that
has it is complete.  Names are matched exactly (``step-`` and decimal digits
without leading zeros), so a temp location such as
``.step-7.torchaux-tmp-...`` can never be taken for a step (torchtitan's
``step-(\\d+)`` scan, orbax's tmp-directory rule: ecosystem-anchors.md §3).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "STEP_PREFIX", "STATE_NAME", "METADATA_NAME", "LATEST_NAME", "FORMAT_VERSION",
    "LAYOUT_FILE", "LAYOUT_SHARDED", "StepInfo", "step_name", "parse_step", "check_step", "check_metrics",
    "encode_metadata", "decode_metadata",
]

STEP_PREFIX = "step-"
#: The checkpoint file inside a step.
STATE_NAME = "state.pt"
#: The commit marker inside a step: step number, metrics, encryption mode.
METADATA_NAME = "metadata.json"
#: The ``latest`` pointer beside the steps: a hint for people and tools only.
LATEST_NAME = "latest"
FORMAT_VERSION = 1
#: Layouts of a step: one engine file, or a torchaux.distributed checkpoint of every rank.
LAYOUT_FILE = "file"
LAYOUT_SHARDED = "distributed"

_STEP_RE = re.compile(r"step-(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class StepInfo:
    """A committed step as listed from storage."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    encrypted: str | None = None
    layout: str = LAYOUT_FILE


def step_name(step: int) -> str:
    """The folder name of ``step``.

    >>> step_name(500)
    'step-500'
    """
    return f"{STEP_PREFIX}{step}"


def parse_step(name: str) -> int | None:
    """The step number a folder name denotes, or None if it is not exactly a step name.

    >>> parse_step("step-12"), parse_step(".step-12.torchaux-tmp-1-ab"), parse_step("step-012")
    (12, None, None)
    """
    match = _STEP_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def check_step(step: object, who: str = "save") -> int:
    """Refuse a step that is not a non-negative int.

    >>> check_step(3)
    3
    >>> check_step(-1)
    Traceback (most recent call last):
    ...
    ValueError: save: step must be >= 0; got -1
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{who}: step must be an int; got {type(step).__name__} ({step!r})")
    if step < 0:
        raise ValueError(f"{who}: step must be >= 0; got {step}")
    return step


def check_metrics(metrics: object) -> dict[str, float]:
    """Refuse metrics that are not a ``str -> finite number`` mapping (they are stored as JSON).

    >>> check_metrics({"loss": 0.5})
    {'loss': 0.5}
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of str -> number; got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metrics keys must be str; got {type(key).__name__} ({key!r})")
        if hasattr(value, "item") and callable(value.item):
            value = value.item()  # a 0-d tensor or numpy scalar
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"metrics[{key!r}] must be a number (or 0-d tensor); got {type(value).__name__}"
            )
        if not math.isfinite(value):
            raise ValueError(f"metrics[{key!r}] must be finite (stored as JSON); got {value}")
        out[key] = float(value)
    return out


def encode_metadata(info: StepInfo) -> bytes:
    """The commit marker's bytes.

    >>> decode_metadata(encode_metadata(StepInfo(5, {"loss": 1.0})), "m")
    StepInfo(step=5, metrics={'loss': 1.0}, encrypted=None, layout='file')
    """
    doc = {
        "format": FORMAT_VERSION, "step": info.step, "metrics": info.metrics,
        "encrypted": info.encrypted, "layout": info.layout,
    }
    return json.dumps(doc, sort_keys=True).encode()


def decode_metadata(data: bytes, where: str) -> StepInfo | None:
    """Parse a commit marker; None when it is damaged (the step then does not count)."""
    try:
        doc = json.loads(data)
        step = check_step(doc["step"], where)
        metrics = check_metrics(doc.get("metrics") or {})
        encrypted = doc.get("encrypted")
        if encrypted is not None and not isinstance(encrypted, str):
            return None
        layout = doc.get("layout", LAYOUT_FILE)  # markers before layouts: one file
        if layout not in (LAYOUT_FILE, LAYOUT_SHARDED):
            return None
    except (ValueError, TypeError, KeyError):
        return None
    return StepInfo(step, metrics, encrypted, layout)
