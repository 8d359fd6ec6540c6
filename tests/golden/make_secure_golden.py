"""Regenerate the secure-checkpoint golden files (only on a deliberate format change).

    python tests/golden/make_secure_golden.py

The key is public test data; encryption randomness is replaced by a seeded
generator so the bytes are reproducible.  A byte change here is a format
change: update docs/FORMAT.md and bump the version in the same commit.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

import torchaux
from torchaux.checkpoint.crypto import header as crypto_header

HERE = Path(__file__).resolve().parent
KEY = bytes(range(32))

#: file name -> save_checkpoint keyword arguments
CASES: dict[str, dict[str, object]] = {
    "ckpt_crc_v1.ckpt": {"crc_check": True},
    "safetensors_crc_v1.safetensors": {"format": "safetensors", "crc_check": True},
    "enc_aes_gcm_v1.ckpt": {"enc_key": KEY, "enc_mode": "AES-GCM", "crc_check": True},
    "enc_aes_cbc_v1.ckpt": {"enc_key": KEY[:24], "enc_mode": "AES-CBC"},
    "enc_sm4_cbc_v1.safetensors": {"enc_key": KEY[:16], "enc_mode": "SM4-CBC", "format": "safetensors"},
    # Encrypted envelope version 2: a checkpoint identity in the authenticated header.
    "enc_aes_gcm_id_v2.ckpt": {
        "enc_key": KEY, "enc_mode": "AES-GCM", "crc_check": True, "enc_aad": "golden/step-3",
    },
    "enc_sm4_cbc_id_v2.safetensors": {
        "enc_key": KEY[:16], "enc_mode": "SM4-CBC", "format": "safetensors",
        "enc_aad": "golden/\u03b1-step-3",
    },
}


def golden_entries() -> dict[str, object]:
    """What every secure golden file holds."""
    return {
        "layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "layer.bias": torch.tensor([0.5, -1.5], dtype=torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.int64),
    }


APPEND = {"epoch": 3, "lr": 0.25, "tag": "golden"}


def golden_bytes(name: str) -> bytes:
    """Bytes save_checkpoint writes for case ``name`` with seeded randomness."""
    saved = crypto_header.random_bytes
    crypto_header.random_bytes = random.Random(0).randbytes
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, name)
            torchaux.save_checkpoint(golden_entries(), path, append_dict=APPEND, **CASES[name])
            return Path(path).read_bytes()
    finally:
        crypto_header.random_bytes = saved


if __name__ == "__main__":
    # Existing golden files are never rewritten: they pin what old versions wrote.
    for case in CASES:
        if not (HERE / case).exists():
            (HERE / case).write_bytes(golden_bytes(case))
