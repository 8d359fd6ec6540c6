"""The torch.save writer's storage alignment: 4096 where a direct-I/O file writes staged buffers in place."""

from __future__ import annotations

import pathlib
import zipfile

import pytest
import torch

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.storage.direct_io import enable_direct_io


def _direct_io_here(directory: pathlib.Path) -> bool:
    probe = directory / "probe"
    with open(probe, "wb") as f:
        ok = enable_direct_io(f.fileno())
    probe.unlink()
    return ok


def _layout(path: pathlib.Path) -> tuple[str, list[int]]:
    with zipfile.ZipFile(path) as z:
        alignment = z.read(next(n for n in z.namelist() if n.endswith(".storage_alignment"))).decode()
        offsets = [_data_offset(path, i) for i in z.infolist() if "/data/" in i.filename]
        return alignment, offsets


def _data_offset(path: pathlib.Path, info: zipfile.ZipInfo) -> int:
    # Local header: 30 bytes, then the name and the extra field.
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len


LARGE = {f"w{i}": torch.randn(1 << 20) for i in range(4)}  # 4 x 4 MiB
SMALL = {"w": torch.randn(10), "b": torch.zeros(3)}


def test_large_states_on_direct_io_are_4096_aligned_and_load_everywhere(tmp_path: pathlib.Path) -> None:
    """Records start at 4096-byte offsets, .storage_alignment says so, and every torch.load mode reads it."""
    if not _direct_io_here(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    path = tmp_path / "big.pt"
    torchaux.save_async(LARGE, path).wait(timeout=120)
    alignment, offsets = _layout(path)
    assert alignment == "4096"
    assert offsets and all(o % 4096 == 0 for o in offsets)
    from torch.utils.serialization import config

    for mmap in (False, True):
        got = torch.load(path, mmap=mmap, weights_only=True)
        assert all(torch.equal(got[k], v) for k, v in LARGE.items())
    previous = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True  # torch computes offsets from .storage_alignment
    try:
        got = torch.load(path, mmap=True, weights_only=True)
        assert all(torch.equal(got[k], v) for k, v in LARGE.items())
    finally:
        config.load.calculate_storage_offsets = previous


def test_it_equals_torch_save_with_storage_alignment_4096(tmp_path: pathlib.Path) -> None:
    """The layout is torch.save's own with config.save.storage_alignment = 4096 (same record offsets)."""
    if not _direct_io_here(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    from torch.utils.serialization import config

    ours, ref = tmp_path / "big.pt", tmp_path / "ref" / "big.pt"
    ref.parent.mkdir()
    torchaux.save_async(LARGE, ours).wait(timeout=120)
    config.save.storage_alignment = 4096
    try:
        torch.save(LARGE, ref)
    finally:
        config.save.storage_alignment = 64
    assert _layout(ours) == _layout(ref)


@pytest.mark.parametrize("case", ["small-state", "direct-io-off", "file-object"])
def test_otherwise_torch_saves_default_64(tmp_path: pathlib.Path, case: str) -> None:
    """Small states (padding would dominate), buffered files and file objects keep torch's 64."""
    import io

    if case == "file-object":
        buf = io.BytesIO()
        torchaux.save_async(LARGE, buf).wait(timeout=120)
        path = tmp_path / "obj.pt"
        path.write_bytes(buf.getvalue())
    else:
        path = tmp_path / "x.pt"
        with _knobs.override(direct_io=0 if case == "direct-io-off" else 1):
            torchaux.save_async(SMALL if case == "small-state" else LARGE, path).wait(timeout=120)
    alignment, offsets = _layout(path)
    assert alignment == "64"
    assert all(o % 64 == 0 for o in offsets)
