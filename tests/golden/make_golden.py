"""Regenerate the golden files (run only on a deliberate format change).

    python tests/golden/make_golden.py

Any byte change of these files is a format change: document it in
docs/FORMAT.md and bump the format version in the same commit.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

import torchaux

HERE = Path(__file__).resolve().parent


def golden_object() -> dict[str, object]:
    """The object every golden file holds."""
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {
        "w": w,
        "w_t": w.t(),  # shares w's storage
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.int64),
        "step": 3,
        "name": "golden",
    }


def golden_bytes() -> bytes:
    """What save_async writes for the golden object into a file object."""
    buf = io.BytesIO()
    torchaux.save_async(golden_object(), buf).wait()
    return buf.getvalue()


if __name__ == "__main__":
    (HERE / "torch_save_v1.pt").write_bytes(golden_bytes())
