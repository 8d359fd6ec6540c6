"""storage/remote.py against a real S3 server (moto, 127.0.0.1): upload, commit, abort, read."""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import pytest
import torch

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.storage import remote

WAIT_S = 60.0
MIB = 1 << 20
KEY = bytes(range(32))


def test_is_url_and_storage_options_checks(tmp_path: Any) -> None:
    assert remote.is_url("s3://b/k") and not remote.is_url(str(tmp_path))
    with pytest.raises(ValueError, match="only apply to URLs"):
        remote.check_storage_options({"anon": True}, str(tmp_path / "a.pt"))
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        remote.check_storage_options(["anon"], "s3://b/k")
    with pytest.raises(ValueError, match="not supported"):
        remote.filesystem("gcs://b/k")


def test_small_object_is_one_put(s3_bucket: Any) -> None:
    with remote.upload(s3_bucket.url("small.bin"), s3_bucket.storage_options) as f:
        f.write(b"hello")
    assert s3_bucket.fs.cat_file(f"{s3_bucket.name}/small.bin") == b"hello"


def test_multipart_upload_streams_with_bounded_buffers(s3_bucket: Any) -> None:
    """A 37 MiB object in 5 MiB parts: exact bytes, at most concurrency+1 part buffers."""
    data = os.urandom(37 * MIB)
    fs, path = remote.filesystem(s3_bucket.url("big.bin"), s3_bucket.storage_options)
    writer = remote.MultipartWriter(fs, path, part_bytes=5 * MIB, concurrency=2)
    view = memoryview(data)
    for start in range(0, len(data), 3 * MIB + 17):  # writes that straddle part boundaries
        writer.write(view[start:start + 3 * MIB + 17])
    assert writer._buffers_made <= 3
    writer.commit()
    assert fs.cat_file(path) == data


def test_failed_write_leaves_no_object_and_keeps_the_old_one(s3_bucket: Any) -> None:
    url = s3_bucket.url("model.pt")
    with remote.upload(url, s3_bucket.storage_options) as f:
        f.write(b"old")
    with _knobs.override(upload_part_bytes=5 * MIB):
        with pytest.raises(RuntimeError, match="injected"):
            with remote.upload(url, s3_bucket.storage_options) as f:
                f.write(os.urandom(12 * MIB))  # two parts uploaded, then the failure
                raise RuntimeError("injected")
    assert s3_bucket.fs.cat_file(f"{s3_bucket.name}/model.pt") == b"old"
    fs, _ = remote.filesystem(url, s3_bucket.storage_options)
    assert remote.abort_uploads(fs, f"{s3_bucket.name}/") == []  # aborted, not abandoned


def test_a_failed_part_is_raised_and_nothing_appears(s3_bucket: Any) -> None:
    """A part the server refuses (its upload was aborted under it) fails the save."""
    url = s3_bucket.url("x.bin")
    fs, _ = remote.filesystem(url, s3_bucket.storage_options)
    with _knobs.override(upload_part_bytes=5 * MIB, upload_concurrency=1):
        with pytest.raises(OSError):
            with remote.upload(url, s3_bucket.storage_options) as f:
                f.write(os.urandom(5 * MIB))  # starts the multipart upload
                remote.abort_uploads(fs, f"{s3_bucket.name}/")  # the server forgets it
                for _ in range(4):
                    f.write(os.urandom(5 * MIB))
    assert s3_bucket.keys() == []


def test_save_async_to_s3_round_trip(s3_bucket: Any) -> None:
    state = {"w": torch.randn(1000), "step": 3, "nested": [torch.arange(5)]}
    url = s3_bucket.url("ckpt/state.pt")
    handle = torchaux.save_async(state, url, storage_options=s3_bucket.storage_options)
    state["w"].zero_()  # the snapshot was taken at the call
    assert handle.wait(WAIT_S) == url
    loaded = torch.load(io.BytesIO(s3_bucket.fs.cat_file(f"{s3_bucket.name}/ckpt/state.pt")),
                        weights_only=True)
    assert loaded["step"] == 3 and not torch.equal(loaded["w"], state["w"])
    assert torch.equal(loaded["nested"][0], torch.arange(5))


def test_save_async_refuses_bad_remote_targets_before_any_work(s3_bucket: Any, tmp_path: Any) -> None:
    opts = s3_bucket.storage_options
    with pytest.raises(ValueError, match="bucket 'no-such-bucket-x' does not exist"):
        torchaux.save_async({"a": 1}, "s3://no-such-bucket-x/a.pt", storage_options=opts)
    with pytest.raises(ValueError, match="names no object"):
        torchaux.save_async({"a": 1}, s3_bucket.url("dir/"), storage_options=opts)
    with pytest.raises(ValueError, match="only apply to URLs"):
        torchaux.save_async({"a": 1}, str(tmp_path / "a.pt"), storage_options=opts)
    assert s3_bucket.keys() == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_save_checkpoint_encrypted_with_crc_to_s3_and_load(s3_bucket: Any, fmt: str) -> None:
    net = torch.nn.Linear(8, 4)
    url = s3_bucket.url(f"net.{fmt}")
    opts = s3_bucket.storage_options
    torchaux.save_checkpoint(net, url, enc_key=KEY, crc_check=True, format=fmt,
                             append_dict={"epoch": 2}, storage_options=opts)
    loaded = torchaux.load_checkpoint(url, dec_key=KEY, crc_check=True, storage_options=opts)
    assert torch.equal(loaded["weight"], net.weight.detach()) and loaded["epoch"] == 2
    with pytest.raises(torchaux.DecryptionError):
        torchaux.load_checkpoint(url, dec_key=bytes(32), storage_options=opts)


def test_load_checkpoint_detects_a_damaged_remote_file(s3_bucket: Any) -> None:
    url = s3_bucket.url("plain.ckpt")
    opts = s3_bucket.storage_options
    torchaux.save_checkpoint({"w": torch.ones(64)}, url, crc_check=True, storage_options=opts)
    key = f"{s3_bucket.name}/plain.ckpt"
    data = bytearray(s3_bucket.fs.cat_file(key))
    at = data.find(torch.ones(64).numpy().tobytes())
    data[at + 5] ^= 0xFF
    s3_bucket.fs.pipe_file(key, bytes(data))
    with pytest.raises(torchaux.IntegrityError):
        torchaux.load_checkpoint(url, crc_check=True, storage_options=opts)
    with pytest.raises(ValueError, match="does not exist"):
        torchaux.load_checkpoint(s3_bucket.url("missing.ckpt"), storage_options=opts)


def test_process_mode_refuses_urls(s3_bucket: Any) -> None:
    with pytest.raises(ValueError, match="local files only"):
        torchaux.save_checkpoint({"w": torch.ones(2)}, s3_bucket.url("p.ckpt"), async_save="process",
                                 storage_options=s3_bucket.storage_options)


def test_the_caller_returns_while_the_upload_runs(s3_bucket: Any, make_saver: Any) -> None:
    """Staging stays on the caller; the upload happens on the writer thread."""
    gate, entered = threading.Event(), threading.Event()

    def gated(target: str) -> Any:
        entered.set()
        assert gate.wait(WAIT_S)
        return remote.upload(target, s3_bucket.storage_options)

    saver = make_saver(sink=gated)
    handle = torchaux.save_async({"w": torch.ones(4)}, s3_bucket.url("g.pt"), saver=saver,
                                 storage_options=s3_bucket.storage_options)
    assert entered.wait(WAIT_S) and handle.staged.done() and not handle.done()
    assert s3_bucket.keys() == []
    gate.set()
    handle.wait(WAIT_S)
    assert s3_bucket.keys() == ["g.pt"]
