"""The on-disk bytes are the contract: save_async output is pinned by golden files."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import torch

_GOLDEN_DIR = Path(__file__).resolve().parents[2] / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", _GOLDEN_DIR / "make_golden.py")
assert _spec is not None and _spec.loader is not None
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


def test_output_is_byte_identical_to_golden_file() -> None:
    """save_async writes exactly the committed golden bytes (any change is a format change)."""
    assert make_golden.golden_bytes() == (_GOLDEN_DIR / "torch_save_v1.pt").read_bytes()


def test_golden_file_loads_with_plain_torch_load() -> None:
    """The golden file is a torch.save file: torch.load(weights_only=True) reads it."""
    data = (_GOLDEN_DIR / "torch_save_v1.pt").read_bytes()
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    expected = make_golden.golden_object()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and loaded[key].stride() == value.stride()
            assert torch.equal(loaded[key], value)
        else:
            assert loaded[key] == value
    assert loaded["w_t"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()
