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
        crc_check=bool(case.get("crc_check", False)), expected_id=case.get("enc_aad"),
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


@pytest.mark.parametrize("name", sorted(n for n in golden.CASES if "enc_aad" in golden.CASES[n]))
def test_v2_golden_files_carry_their_identity(name: str, tmp_path: Path) -> None:
    """Envelope v2: header version 2, length 94 + identity, identity checked on load."""
    case = golden.CASES[name]
    blob = (_GOLDEN / name).read_bytes()
    identity = str(case["enc_aad"]).encode()
    assert blob[8:10] == (2).to_bytes(2, "big")
    assert int.from_bytes(blob[10:12], "big") == 94 + len(identity)
    assert blob[56:58] == len(identity).to_bytes(2, "big") and blob[58 : 58 + len(identity)] == identity
    path = tmp_path / name
    shutil.copy(_GOLDEN / name, path)
    with pytest.raises(torchaux.DecryptionError, match="not the expected checkpoint"):
        torchaux.load_checkpoint(
            path, dec_key=case["enc_key"], dec_mode=None, expected_id="golden/step-4"
        )
    assert torchaux.load_checkpoint(path, dec_key=case["enc_key"], dec_mode=None)  # id optional


@pytest.mark.parametrize("name", sorted(n for n in golden.CASES if "enc_key" in golden.CASES[n]
                                        and "enc_aad" not in golden.CASES[n]))
def test_v1_golden_files_are_refused_when_an_identity_is_expected(name: str, tmp_path: Path) -> None:
    """A version-1 file has no identity, so it cannot stand in for an expected one (rollback)."""
    case = golden.CASES[name]
    path = tmp_path / name
    shutil.copy(_GOLDEN / name, path)
    blob = path.read_bytes()
    assert blob[8:10] == (1).to_bytes(2, "big") and len(blob) > 92
    with pytest.raises(torchaux.DecryptionError, match="carries no identity"):
        torchaux.load_checkpoint(path, dec_key=case["enc_key"], dec_mode=None, expected_id="x")
