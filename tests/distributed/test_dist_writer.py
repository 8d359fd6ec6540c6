"""StorageWriter under stock DCP entry points, one process (tests src/torchaux/distributed/writer.py)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import torchaux.distributed as td
from torchaux.distributed.metadata import read_metadata


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(step: int) -> dict:
    return {"w": torch.arange(12.0).reshape(3, 4) + step, "b": torch.ones(5, dtype=torch.bfloat16),
            "nested": {"n": torch.tensor(step)}, "step": step, "name": "run-1"}


def _data_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".distcp"))


def test_stock_reader_and_dcp_to_torch_save_read_torchaux_checkpoints(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    dcp.save(_state(3), storage_writer=td.StorageWriter(d))
    out = {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16),
           "nested": {"n": torch.tensor(0)}, "step": 0, "name": ""}
    dcp.load(out, checkpoint_id=str(d))  # stock FileSystemReader
    assert torch.equal(out["w"], _state(3)["w"]) and out["step"] == 3 and out["name"] == "run-1"
    dcp_to_torch_save(str(d), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert torch.equal(full["nested"]["n"], torch.tensor(3)) and full["b"].dtype == torch.bfloat16


def test_extras_record_checksums_version_and_generation(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    dcp.save(_state(0), storage_writer=td.StorageWriter(d, checksum="crc32"))
    extras = read_metadata(d).storage_data[td.EXTRAS_KEY]
    assert extras["checksum"] == "crc32" and extras["encryption"] is None
    (name,) = extras["files"]
    assert name == _data_files(d)[0] and extras["generation"] in name
    assert len(extras["files"][name]["checksums"]) == 5  # one per chunk


def test_overwrite_uses_new_files_and_removes_the_old_generation(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    dcp.save(_state(1), storage_writer=td.StorageWriter(d))
    first = _data_files(d)
    dcp.save(_state(2), storage_writer=td.StorageWriter(d))
    second = _data_files(d)
    assert len(second) == 1 and set(first).isdisjoint(second)
    assert td.load_full(d)["step"] == 2
    assert not [p for p in d.iterdir() if p.name.startswith(".torchaux-tmp-")]


def test_crash_before_the_metadata_rename_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "ck"
    td.save(_state(1), d)
    import torchaux.distributed.commit as commit

    def crash(path: str, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed between publishing the files and the index")

    monkeypatch.setattr(commit, "atomic_write", crash)
    with pytest.raises(CheckpointException, match="killed between"):  # DCP wraps every failure
        dcp.save(_state(2), storage_writer=td.StorageWriter(d))
    assert td.load_full(d)["step"] == 1  # old index, old untouched files
    assert len(_data_files(d)) == 2  # the new generation's orphan is still there ...
    monkeypatch.undo()
    td.save(_state(3), d)
    assert td.load_full(d)["step"] == 3 and len(_data_files(d)) == 1  # ... until the next save


def test_async_save_thread_with_stager_snapshots_at_the_call(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    live = _state(4)
    stager = td.Stager()
    fut = dcp.async_save(live, storage_writer=td.StorageWriter(d), async_stager=stager)
    live["w"].add_(100)
    fut.result()
    assert torch.equal(td.load_full(d)["w"], _state(4)["w"])
    stager.close()


def test_encrypted_checkpoint_refuses_the_stock_reader(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    key = bytes(range(32))
    dcp.save(_state(5), storage_writer=td.StorageWriter(d, enc_key=key))
    assert (os.stat(d / _data_files(d)[0]).st_mode & 0o777) == 0o600
    assert b"run-1" not in (d / _data_files(d)[0]).read_bytes()
    with pytest.raises(CheckpointException, match="Unknown extension"):
        dcp.load({"w": torch.zeros(3, 4)}, checkpoint_id=str(d))
    assert td.load_full(d, dec_key=key)["name"] == "run-1"


def test_bad_arguments_fail_before_any_io(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="path must be"):
        td.StorageWriter(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parent directory"):
        td.StorageWriter(tmp_path / "no" / "such")
    with pytest.raises(ValueError):
        td.StorageWriter(tmp_path / "x", enc_key=b"short")
    with pytest.raises(Exception, match="unknown checksum"):
        td.StorageWriter(tmp_path / "x", checksum="md5")
    assert not (tmp_path / "x").exists()


def test_large_chunks_go_to_the_disk_in_place_and_stock_readers_still_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of >= 1 MiB: page-aligned payloads, written from the tensors' memory, read by stock DCP."""
    from torchaux.checkpoint.storage import direct_io
    from torchaux.distributed import in_place

    queued: list[int] = []
    real = direct_io.DirectFile._queue

    def spy(self: direct_io.DirectFile, buf: object, n: int) -> None:
        if isinstance(buf, memoryview):
            queued.append(n)
        real(self, buf, n)  # type: ignore[arg-type]

    monkeypatch.setattr(direct_io.DirectFile, "_queue", spy)
    big = {"a": torch.randn(512, 1024), "b": torch.arange(300_001, dtype=torch.float64),
           "small": torch.ones(3), "c": torch.randn(1024, 257).t(), "step": 7}
    d = tmp_path / "ck"
    td.save(big, d)
    fd = os.open(d / _data_files(d)[0], os.O_RDONLY)
    try:
        direct = direct_io.enable_direct_io(fd)
    finally:
        os.close(fd)
    if direct:  # the file system takes O_DIRECT: the payloads were not copied
        assert sum(queued) >= 2 * in_place.IN_PLACE_MIN_BYTES, queued
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in big.items()}
    dcp.load(out, checkpoint_id=str(d))  # stock FileSystemReader: chunks by offset and length
    assert all(torch.equal(out[k], big[k]) for k in ("a", "b", "small", "c")) and out["step"] == 7
    dcp_to_torch_save(str(d), str(tmp_path / "full.pt"))
    assert torch.equal(torch.load(tmp_path / "full.pt", weights_only=True)["b"], big["b"])
    assert torch.equal(td.load_full(d)["a"], big["a"])
    # Every large chunk's payload starts on a 4 KiB boundary of the file.
    md = read_metadata(d)
    blob = (d / _data_files(d)[0]).read_bytes()
    aligned = 0
    for index, info in md.storage_data.items():
        if getattr(index, "fqn", "") in ("a", "b"):
            chunk = blob[info.offset : info.offset + info.length]
            archive = torch._C.PyTorchFileReader(io.BytesIO(chunk))
            aligned += (info.offset + archive.get_record_offset("data/0")) % 4096 == 0
    assert aligned == 2
    # A flipped payload byte is caught by the chunk checksum.
    path = d / _data_files(d)[0]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    from torchaux.errors import IntegrityError

    with pytest.raises(IntegrityError):
        td.load_full(d)
