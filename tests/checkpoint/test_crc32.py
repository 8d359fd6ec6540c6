"""crc32: zlib-ng's SIMD CRC-32 with zlib's values, and the documented fallback to zlib."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from torchaux.checkpoint import crc32 as crc_module


@pytest.mark.parametrize("size", [0, 1, 63, 64, 4095, 1 << 16, (1 << 20) + 7])
def test_values_are_zlibs(size: int) -> None:
    """Every size (SIMD folding has tails at 16/64-byte boundaries) gives zlib.crc32's value, chained too."""
    data = os.urandom(size)
    assert crc_module.crc32(data) == zlib.crc32(data)
    half = size // 2
    assert crc_module.crc32(data[half:], crc_module.crc32(data[:half])) == zlib.crc32(data)
    assert crc_module.crc32(memoryview(data)) == zlib.crc32(data)


def test_storage_views_are_accepted() -> None:
    """The writer passes memoryviews of tensor storages."""
    t = torch.arange(1000, dtype=torch.float32)
    view = memoryview(t.numpy()).cast("B")
    assert crc_module.crc32(view) == zlib.crc32(t.numpy().tobytes())


def test_the_simd_backend_is_installed() -> None:
    """zlib-ng is a declared dependency, so a normal install runs the fast path."""
    assert crc_module.BACKEND == "zlib-ng"


def test_without_zlib_ng_saves_and_checks_still_work(tmp_path: Path) -> None:
    """With zlib_ng unimportable, BACKEND is zlib and a CRC'd save loads and verifies."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["zlib_ng"] = None
        sys.modules["zlib_ng.zlib_ng"] = None
        import torch, torchaux
        from torchaux.checkpoint import crc32
        assert crc32.BACKEND == "zlib", crc32.BACKEND
        state = {{"w": torch.arange(1 << 20, dtype=torch.float32)}}
        torchaux.save_checkpoint(state, {str(tmp_path / "a.ckpt")!r}, crc_check=True)
        got = torchaux.load_checkpoint({str(tmp_path / "a.ckpt")!r}, crc_check=True)
        assert torch.equal(got["w"], state["w"])
        torchaux.save_async(state, {str(tmp_path / "b.pt")!r}).wait()
        assert torch.equal(torch.load({str(tmp_path / "b.pt")!r})["w"], state["w"])
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
