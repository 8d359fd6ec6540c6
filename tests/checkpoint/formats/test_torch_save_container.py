"""The zip container writer reproduces torch.save's bytes (tests pin the layout)."""

from __future__ import annotations

import io
import os
import zipfile
import zlib

import pytest
import torch

import torchaux
from torchaux.checkpoint.formats.torch_save.writer import archive_name_for
from torchaux.checkpoint.formats.torch_save.container import TorchZipWriter, storage_view

_SID = ".data/serialization_id"


def _members(data: bytes) -> dict[str, bytes]:
    z = zipfile.ZipFile(io.BytesIO(data))
    return {i.filename: z.read(i) for i in z.infolist()}


def _strip_sid(data: bytes, archive: str) -> bytes:
    """Bytes with the 40 serialization-id digits and their CRCs blanked out."""
    z = zipfile.ZipFile(io.BytesIO(data))
    info = z.getinfo(f"{archive}/{_SID}")
    out = bytearray(data)
    sid = z.read(info)
    start = out.index(sid)
    out[start : start + len(sid)] = b"0" * len(sid)
    crc = info.CRC.to_bytes(4, "little")
    while (i := out.find(crc)) != -1:
        out[i : i + 4] = b"\0" * 4
    return bytes(out)


@pytest.mark.parametrize(
    "obj",
    [
        {"a": torch.arange(3.0), "b": torch.zeros(0), "s": "x", "n": None},
        {"t": torch.randn(7, 5).t(), "v": torch.randn(100)[3:9]},
        [torch.ones(2, dtype=torch.bfloat16), torch.tensor(True), torch.tensor(1 + 2j)],
    ],
    ids=["mixed", "views", "list"],
)
def test_bytes_equal_torch_save_except_serialization_id(obj: object) -> None:
    """save_async's output equals torch.save's byte for byte, serialization id aside."""
    ref, out = io.BytesIO(), io.BytesIO()
    torch.save(obj, ref)
    torchaux.save_async(obj, out).wait()
    assert len(ref.getvalue()) == len(out.getvalue())
    assert _strip_sid(ref.getvalue(), "archive") == _strip_sid(out.getvalue(), "archive")


def test_serialization_id_crc_half_matches_torch() -> None:
    """The CRC half of the serialization id follows torch's formula exactly."""
    obj = {"w": torch.arange(10.0)}
    ref, out = io.BytesIO(), io.BytesIO()
    torch.save(obj, ref)
    torchaux.save_async(obj, out).wait()
    sid_ref = _members(ref.getvalue())[f"archive/{_SID}"]
    sid_out = _members(out.getvalue())[f"archive/{_SID}"]
    assert len(sid_out) == 40 and sid_out.isdigit()
    assert sid_out[20:] == sid_ref[20:]


def test_path_save_uses_torch_archive_name(tmp_path: os.PathLike[str]) -> None:
    """A path save names the zip folder like torch.save(path) does."""
    path = os.path.join(tmp_path, "model.step3.pt")
    torchaux.save_async({"x": torch.ones(1)}, path).wait()
    names = zipfile.ZipFile(path).namelist()
    assert names[0] == "model.step3/data.pkl"
    assert archive_name_for(path) == "model.step3"


def test_zip_is_valid_and_crcs_verify() -> None:
    """Python's zipfile verifies every member CRC of our output."""
    out = io.BytesIO()
    torchaux.save_async({"x": torch.randn(1000), "y": torch.zeros(0)}, out).wait()
    assert zipfile.ZipFile(io.BytesIO(out.getvalue())).testzip() is None


def test_data_is_aligned_for_mmap(tmp_path: os.PathLike[str]) -> None:
    """Tensor data starts on a 64-byte boundary, so torch.load(mmap=True) works."""
    path = os.path.join(tmp_path, "m.pt")
    obj = {"a": torch.randn(33), "b": torch.arange(5, dtype=torch.int64)}
    torchaux.save_async(obj, path).wait()
    loaded = torch.load(path, mmap=True, weights_only=True)
    assert torch.equal(loaded["a"], obj["a"]) and torch.equal(loaded["b"], obj["b"])


def test_writer_rejects_use_after_finish() -> None:
    """A finished writer refuses further records instead of corrupting the archive."""
    w = TorchZipWriter(io.BytesIO())
    w.finish()
    with pytest.raises(RuntimeError, match="finish"):
        w.write_record("x", b"1")


def test_storage_view_rejects_device_storage() -> None:
    """storage_view only reads host memory."""
    s = torch.empty(4, device="meta").untyped_storage()
    with pytest.raises(ValueError, match="CPU"):
        storage_view(s)


def _differing_positions(path_a: str, path_b: str, chunk: int = 64 << 20) -> list[int]:
    diffs: list[int] = []
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        pos = 0
        while True:
            a, b = fa.read(chunk), fb.read(chunk)
            if not a and not b:
                return diffs
            if a != b:
                diffs += [pos + i for i in range(min(len(a), len(b))) if a[i] != b[i]]
                diffs += list(range(pos + min(len(a), len(b)), pos + max(len(a), len(b))))
            pos += max(len(a), len(b))


@pytest.mark.slow
def test_zip64_layout_matches_torch_save(tmp_path: os.PathLike[str]) -> None:
    """Members past 4 GiB (size and offset) get torch's exact ZIP64 layout."""
    big = torch.zeros(4_300_000_000, dtype=torch.uint8)
    big[-1] = 7
    obj = {"a": torch.arange(3.0), "big": big, "empty": torch.zeros(0), "c": torch.arange(5.0)}
    os.makedirs(os.path.join(tmp_path, "ref"))
    os.makedirs(os.path.join(tmp_path, "out"))
    ref_path = os.path.join(tmp_path, "ref", "m.pt")
    out_path = os.path.join(tmp_path, "out", "m.pt")
    torchaux.save_async(obj, out_path).wait()
    # On direct I/O a state this large is written at storage alignment 4096
    # (formats/torch_save/writer.py): compare with torch.save at the same setting.
    with zipfile.ZipFile(out_path) as z:
        alignment = int(z.read("m/.storage_alignment"))
    from torch.utils.serialization import config

    config.save.storage_alignment = alignment
    try:
        torch.save(obj, ref_path)
    finally:
        config.save.storage_alignment = 64
    del big, obj
    assert os.path.getsize(ref_path) == os.path.getsize(out_path)
    with zipfile.ZipFile(out_path) as z:
        sid = z.getinfo(f"m/{_SID}")
        infos = z.infolist()
    with open(out_path, "rb") as f:
        f.seek(sid.header_offset + 28)
        extra_len = int.from_bytes(f.read(2), "little")
    sid_data = sid.header_offset + 30 + len(sid.filename) + extra_len
    allowed = set(range(sid_data, sid_data + 40 + 24))  # digits + data descriptor
    size = os.path.getsize(out_path)
    with open(out_path, "rb") as f:
        f.seek(size - 200)
        tail = f.read()
    cd_start = size - 200 + tail.rindex(b"PK\x01\x02")
    allowed |= set(range(cd_start + 16, cd_start + 20))  # CRC field of its directory entry
    diffs = _differing_positions(ref_path, out_path)
    assert [d for d in diffs if d not in allowed] == []
    assert len(infos) == 10
    loaded = torch.load(out_path, weights_only=True, mmap=True)
    assert loaded["big"].numel() == 4_300_000_000 and int(loaded["big"][-1]) == 7
    assert torch.equal(loaded["c"], torch.arange(5.0))


@pytest.fixture
def concurrent_crc(monkeypatch: pytest.MonkeyPatch) -> int:
    """The zlib fallback's concurrent-CRC threshold (with zlib-ng the CRC runs in line)."""
    from torchaux.checkpoint.formats.torch_save import container as torch_zip

    monkeypatch.setattr(torch_zip, "_CONCURRENT_CRC_BYTES", 8 << 20)
    return 8 << 20


def test_large_member_crc_from_the_concurrent_thread_is_right(concurrent_crc: int) -> None:
    """A member above the concurrent-CRC threshold gets zlib's CRC of its bytes; zipfile agrees."""
    from torchaux.checkpoint.formats.torch_save import container as torch_zip

    size = torch_zip._CONCURRENT_CRC_BYTES + 12345
    data = os.urandom(size)
    out = io.BytesIO()
    w = TorchZipWriter(out)
    w.write_record("big", memoryview(data))
    w.write_record("small", b"abc")
    w.finish()
    assert [crc for _, crc, _ in w.members()] == [zlib.crc32(data), zlib.crc32(b"abc")]
    assert zipfile.ZipFile(io.BytesIO(out.getvalue())).testzip() is None


def test_failed_write_joins_the_crc_thread_before_raising(concurrent_crc: int) -> None:
    """A write error mid-member leaves no CRC thread reading the buffer afterwards."""
    import threading

    from torchaux.checkpoint.formats.torch_save import container as torch_zip

    class Failing(io.BytesIO):
        def write(self, data: object) -> int:
            if self.tell() > 1000:
                raise OSError("disk full")
            return super().write(data)  # type: ignore[arg-type]

    w = TorchZipWriter(Failing())
    with pytest.raises(OSError, match="disk full"):
        w.write_record("big", memoryview(bytes(torch_zip._CONCURRENT_CRC_BYTES * 3)))
    assert not [t for t in threading.enumerate() if t.name == "torchaux-crc32"]


@pytest.mark.parametrize("threaded", [False, True])
def test_short_writes_of_a_raw_file_are_completed(threaded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw stream that takes at most 1000 bytes per call still receives every byte."""
    from torchaux.checkpoint.formats.torch_save import container as torch_zip

    class Trickle(io.BytesIO):
        def write(self, data: object) -> int:
            return super().write(memoryview(data).cast("B")[:1000])  # type: ignore[arg-type]

    if threaded:
        monkeypatch.setattr(torch_zip, "_CONCURRENT_CRC_BYTES", 8 << 20)
    data = os.urandom((8 << 20) + 5000)
    out = Trickle()
    w = TorchZipWriter(out)
    w.write_record("big", memoryview(data))
    w.finish()
    assert zipfile.ZipFile(io.BytesIO(out.getvalue())).read("archive/big") == data


def test_a_stream_that_writes_nothing_is_an_error() -> None:
    """write() returning 0 would loop forever; it raises OSError instead."""

    class Stuck(io.BytesIO):
        def write(self, data: object) -> int:
            return 0

    with pytest.raises(OSError, match="returned 0"):
        TorchZipWriter(Stuck()).write_record("x", b"abc")
