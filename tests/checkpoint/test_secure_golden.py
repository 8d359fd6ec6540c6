"""Secure checkpoint formats are pinned by golden files: bytes and readability."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

import torchaux

pytest.importorskip("cryptography")
pytest.importorskip("safetensors")

_GOLDEN = Path(__file__).resolve().parent.parent / "golden"
_spec = importlib.util.spec_from_file_location("make_secure_golden", _GOLDEN / "make_secure_golden.py")
assert _spec is not None and _spec.loader is not None
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.mark.parametrize("name", sorted(golden.CASES))
def test_writer_reproduces_golden_bytes(name: str) -> None:
    """save_checkpoint writes exactly the committed bytes (with seeded randomness)."""
    assert golden.golden_bytes(name) == (_GOLDEN / name).read_bytes()


@pytest.mark.parametrize("name", sorted(golden.CASES))
def test_golden_file_loads(name: str, tmp_path: Path) -> None:
    """Each committed golden file loads back to the golden entries (reader compatibility)."""
    case = golden.CASES[name]
    path = tmp_path / name
    shutil.copy(_GOLDEN / name, path)
    loaded = torchaux.load_checkpoint(
        path, dec_key=case.get("enc_key"), dec_mode=case.get("enc_mode", "AES-GCM"),
        crc_check=bool(case.get("crc_check", False)),
    )
    expected = {**golden.golden_entries(), **golden.APPEND}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
        else:
            assert type(loaded[key]) is type(value) and loaded[key] == value


def test_plain_golden_files_load_with_upstream_readers() -> None:
    """The unencrypted goldens are a torch.load file and a safetensors file."""
    from safetensors.torch import load_file

    ckpt = torch.load(_GOLDEN / "ckpt_crc_v1.ckpt", weights_only=True)
    assert torch.equal(ckpt["layer.weight"], golden.golden_entries()["layer.weight"])
    st = load_file(str(_GOLDEN / "safetensors_crc_v1.safetensors"))
    assert torch.equal(st["layer.bias"], golden.golden_entries()["layer.bias"])
