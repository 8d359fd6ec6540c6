"""StorageReader: verification, decryption, safe unpickling (tests src/torchaux/distributed/reader.py)."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchaux.distributed as td
from torchaux.distributed.metadata import read_metadata
from torchaux.errors import DecryptionError, IntegrityError, UnsupportedFormatError

KEY = bytes(range(32))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state() -> dict:
    return {"alpha": torch.arange(64.0), "beta": torch.ones(8, 8), "step": 9}


def _data_file(d: Path) -> Path:
    (f,) = [p for p in d.iterdir() if p.name.endswith(".distcp")]
    return f


def _chunk_of(d: Path, fqn: str) -> tuple[int, int]:
    meta = read_metadata(d)
    (info,) = [v for k, v in meta.storage_data.items() if k != td.EXTRAS_KEY and k.fqn == fqn]
    return info.offset, info.length


def test_stock_dcp_checkpoints_load(tmp_path: Path) -> None:
    d = tmp_path / "stock"
    dcp.save(_state(), checkpoint_id=str(d))  # stock FileSystemWriter
    out = {"alpha": torch.zeros(64), "beta": torch.zeros(8, 8), "step": 0}
    td.load(out, d)
    assert torch.equal(out["alpha"], torch.arange(64.0)) and out["step"] == 9
    assert td.load_full(d)["beta"].sum() == 64


@pytest.mark.parametrize("enc_key", [None, KEY], ids=["plain", "encrypted"])
def test_a_flipped_byte_names_the_file_and_the_tensor(tmp_path: Path, enc_key: bytes | None) -> None:
    d = tmp_path / "ck"
    td.save(_state(), d, enc_key=enc_key)
    f = _data_file(d)
    offset, length = _chunk_of(d, "beta")
    data = bytearray(f.read_bytes())
    data[offset + length // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{f.name}.*'beta'"):
        td.load_full(d, dec_key=enc_key)


def test_a_missing_rank_file_is_detected(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    td.save(_state(), d)
    name = _data_file(d).name
    os.unlink(d / name)
    with pytest.raises(IntegrityError, match=rf"{name} .* is missing"):
        td.load({"alpha": torch.zeros(64), "beta": torch.zeros(8, 8), "step": 0}, d)


def test_a_truncated_file_is_detected(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    td.save(_state(), d)
    f = _data_file(d)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        td.load_full(d)


def test_wrong_or_missing_key_raises_decryption_error(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    td.save(_state(), d, enc_key=KEY)
    with pytest.raises(DecryptionError):
        td.load_full(d, dec_key=bytes(32))
    with pytest.raises(DecryptionError, match="pass dec_key"):
        td.load_full(d)
    assert td.load_full(d, dec_key=KEY)["step"] == 9


def test_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    td.save(_state(), d)

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsupportedFormatError, match="posix.system|os.system"):
        td.load_full(d)


class Opaque:
    """A user object: DCP pickles it, weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.x = 1


def test_non_tensor_values_load_weights_only(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    dcp.save({"obj": Opaque(), "t": torch.ones(1)}, checkpoint_id=str(d))
    with pytest.raises(UnsupportedFormatError, match="'obj'.*weights_only"):
        td.load_full(d)


def test_damaged_metadata_is_an_integrity_error(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    td.save(_state(), d)
    raw = (d / ".metadata").read_bytes()
    (d / ".metadata").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match="damaged"):
        td.load_full(d)
    os.unlink(d / ".metadata")
    with pytest.raises(FileNotFoundError, match="no committed"):
        td.load_full(d)


def test_reader_validates_arguments_before_io(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        td.StorageReader(io.BytesIO())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        td.StorageReader(tmp_path, dec_key=b"x")
