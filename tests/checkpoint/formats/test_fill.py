"""checkpoint/formats/fill.py: parallel fills into targets, CRC per piece joined exactly."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from torchaux.checkpoint.crc32 import _crc32_combine_py
from torchaux.checkpoint.formats import fill as fill_mod
from torchaux.checkpoint.formats.fill import (
    BufferSource, FileSource, Target, checksum, crc32_combine, fill,
)
from torchaux.errors import IntegrityError


@pytest.mark.parametrize("n", [0, 1, 15, 4096, 1 << 20])
def test_crc32_combine_matches_zlib(n: int) -> None:
    a, b = os.urandom(33), os.urandom(n)
    whole = zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n) == whole
    assert _crc32_combine_py(zlib.crc32(a), zlib.crc32(b), n) == whole  # the fallback


def _targets(data: bytes, spans: list[tuple[int, int]]) -> list[Target]:
    return [Target(a, memoryview(bytearray(b - a))) for a, b in spans]


@pytest.mark.parametrize("workers", [1, 3])
def test_fill_from_a_file_in_many_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    monkeypatch.setattr(fill_mod, "PIECE_BYTES", 1000)  # every target in several pieces
    data = os.urandom(20_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    spans = [(0, 10), (10, 5010), (6000, 6000 + 3333), (12_000, 20_000)]
    targets = _targets(data, spans)
    with open(path, "rb") as f:
        crcs = fill(FileSource(f.fileno(), "f"), targets, crc=True, workers=workers)
    assert [bytes(t.view) for t in targets] == [data[a:b] for a, b in spans]
    assert crcs == [zlib.crc32(data[a:b]) for a, b in spans]
    assert checksum([t.view for t in targets], workers) == crcs


def test_truncated_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    with open(path, "rb") as f, pytest.raises(IntegrityError, match="ended at byte 100"):
        fill(FileSource(f.fileno(), "f"), _targets(b"", [(50, 150)]))
    with pytest.raises(IntegrityError, match="truncated"):
        fill(BufferSource(bytes(10), "b"), _targets(b"", [(5, 20)]))


def test_a_failing_job_reaches_the_caller() -> None:
    class Broken(BufferSource):
        def jobs(self, targets):  # type: ignore[no-untyped-def]
            def boom() -> list:
                raise OSError("disk gone")
            return [*super().jobs(targets), boom]

    with pytest.raises(OSError, match="disk gone"):
        fill(Broken(bytes(10), "b"), _targets(b"", [(0, 10)]), workers=2)
