"""Chunks read without torch.load's copy (tests src/torchaux/distributed/chunks.py), one process."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

import torchaux.distributed as td
from torchaux.distributed import chunks
from torchaux.distributed.metadata import read_metadata
from torchaux.errors import IntegrityError

_BIG = 1 << 19  # 2 MiB of float32: over the reader's direct-read threshold


def _data_file(directory: Path) -> Path:
    meta = read_metadata(directory)
    (name,) = {i.relative_path for k, i in meta.storage_data.items() if k != td.EXTRAS_KEY}
    return directory / name


def test_big_chunk_is_read_straight_into_the_destination(tmp_path: Path) -> None:
    w = torch.randn(_BIG)
    td.save({"w": w, "b": torch.arange(3.0)}, tmp_path / "ck")
    out = {"w": torch.zeros(_BIG), "b": torch.zeros(3)}
    td.load(out, tmp_path / "ck")
    assert torch.equal(out["w"], w) and out["b"].tolist() == [0.0, 1.0, 2.0]


def test_flipped_payload_byte_of_a_big_chunk_is_detected(tmp_path: Path) -> None:
    td.save({"w": torch.randn(_BIG)}, tmp_path / "ck")
    path = _data_file(tmp_path / "ck")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the payload (the archive's records are small)
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch.*'w'"):
        td.load({"w": torch.zeros(_BIG)}, tmp_path / "ck")


def test_read_into_declines_what_it_cannot_fill_in_place(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(torch.arange(12.0).view(3, 4), buf)
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * 7 + buf.getvalue())
    fd = os.open(path, os.O_RDONLY)
    try:
        length = len(buf.getvalue())
        dest = torch.zeros(3, 4)
        assert chunks.read_into(fd, 7, length, dest, "crc32") is not None
        assert torch.equal(dest, torch.arange(12.0).view(3, 4))
        assert chunks.read_into(fd, 7, length, torch.zeros(4, 3).t(), None) is None  # strided
        assert chunks.read_into(fd, 7, length, torch.zeros(3, 4, dtype=torch.float64), None) is None
    finally:
        os.close(fd)


def test_chunk_tensor_views_the_buffer() -> None:
    buf = io.BytesIO()
    torch.save(torch.arange(6.0), buf)
    view = chunks.chunk_tensor(buf.getbuffer())
    assert view.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="writable"):
        chunks.chunk_tensor(memoryview(bytes(buf.getvalue())))
