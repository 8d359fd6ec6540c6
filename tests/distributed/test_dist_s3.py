"""torchaux.distributed on S3: the local contract on a real S3 server (moto on 127.0.0.1).

Tests src/torchaux/distributed/remote/ (access.py, commit.py) and the URL
paths of api.py, writer.py and reader.py.  Two spawned gloo ranks save FSDP2
+ Adam state, a replicated tensor, a column-sharded DTensor and plain values
to ``s3://``, load them back, read and write stock DCP's ``FsspecReader`` /
``FsspecWriter`` checkpoints and encrypt; a rank whose upload fails commits
nothing and leaves nothing behind; the leftovers of a killed save go with the
next commit.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dist_workers
import s3_dist_workers as workers
import torchaux.distributed as td
from s3_server import S3Bucket, new_bucket
from torchaux.checkpoint.storage import remote
from torchaux.distributed.remote.access import RemoteDir
from torchaux.errors import IntegrityError


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> Iterator[S3Bucket]:
    """One bucket for the module's 2-rank run (s3_bucket is per test)."""
    with new_bucket(s3_endpoint) as b:
        yield b


@pytest.fixture(scope="module")
def contract_run(bucket: S3Bucket, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("s3dist")
    workers.run("contract", 2, bucket.url("t"), bucket.storage_options, str(root))
    return root


def _objects(bucket: S3Bucket, prefix: str) -> list[str]:
    return [k[len(prefix) + 1:] for k in bucket.keys() if k.startswith(prefix + "/")]


def _uploads(bucket: S3Bucket) -> list[str]:
    fs, _ = remote.filesystem(bucket.url("x"), bucket.storage_options)
    listed = fs.call_s3("list_multipart_uploads", Bucket=bucket.name)
    return sorted(u["Key"] for u in listed.get("Uploads", []))


@pytest.mark.multiprocess
def test_two_ranks_round_trip_stock_interop_and_encryption(
    contract_run: Path, bucket: S3Bucket
) -> None:
    """The workers asserted every load; here: the layout on the store after two saves."""
    names = _objects(bucket, "t/plain")
    meta = RemoteDir(bucket.url("t/plain"), bucket.storage_options).read_metadata()
    files = {info.relative_path for k, info in meta.storage_data.items() if k != td.EXTRAS_KEY}
    assert len(files) == 2 and sorted(names) == sorted([".metadata", *files]), names  # one generation
    generation = meta.storage_data[td.EXTRAS_KEY]["generation"]
    assert all(f.startswith(("__0_0_", "__1_0_")) and generation in f for f in files), files
    assert _uploads(bucket) == []


@pytest.mark.multiprocess
def test_save_on_two_loads_whole_in_one_process(contract_run: Path, bucket: S3Bucket) -> None:
    expected = torch.load(contract_run / "expected.pt", weights_only=True)
    got = td.load_full(bucket.url("t/plain"), storage_options=bucket.storage_options)
    dist_workers.assert_same(expected, got)
    now = torch.load(contract_run / "now.pt", weights_only=True)
    key = workers.KEY
    dist_workers.assert_same(now, td.load_full(bucket.url("t/enc"), dec_key=key,
                                               storage_options=bucket.storage_options))
    dist_workers.assert_same(now["model"], td.load_full(
        bucket.url("t/stock"), storage_options=bucket.storage_options)["model"])


@pytest.mark.multiprocess
def test_a_flipped_byte_in_a_data_object_is_an_integrity_error(
    contract_run: Path, bucket: S3Bucket
) -> None:
    fs = bucket.fs
    src, dst = f"{bucket.name}/t/plain", f"{bucket.name}/t/flipped"
    for name in _objects(bucket, "t/plain"):
        fs.copy(f"{src}/{name}", f"{dst}/{name}")
    data_objects = [n for n in _objects(bucket, "t/flipped") if n.endswith(".distcp")]
    biggest = max(data_objects, key=lambda n: fs.size(f"{dst}/{n}"))
    raw = bytearray(fs.cat_file(f"{dst}/{biggest}"))
    raw[len(raw) // 2] ^= 0x01
    fs.pipe_file(f"{dst}/{biggest}", bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        td.load_full(bucket.url("t/flipped"), storage_options=bucket.storage_options)
    # one byte short: the metadata check names the truncated object before any read
    fs.pipe_file(f"{dst}/{biggest}", bytes(raw[:-1]))
    with pytest.raises(IntegrityError, match="truncated"):
        td.load_full(bucket.url("t/flipped"), storage_options=bucket.storage_options)


@pytest.mark.multiprocess
def test_a_rank_whose_upload_fails_commits_nothing_and_leaves_nothing(s3_bucket: S3Bucket) -> None:
    workers.run("failing_rank", 2, s3_bucket.url("r"), s3_bucket.storage_options)
    names = _objects(s3_bucket, "r/fail")
    meta = RemoteDir(s3_bucket.url("r/fail"), s3_bucket.storage_options).read_metadata()
    files = {info.relative_path for k, info in meta.storage_data.items() if k != td.EXTRAS_KEY}
    assert sorted(names) == sorted([".metadata", *files]), names  # the failed save's objects: gone
    assert _uploads(s3_bucket) == []  # the failed rank's multipart upload was aborted


def test_leftovers_of_a_killed_save_go_with_the_next_commit(s3_bucket: S3Bucket) -> None:
    """A killed rank leaves a complete unreferenced object or an open multipart upload."""
    url, options, fs = s3_bucket.url("k"), s3_bucket.storage_options, s3_bucket.fs
    td.save({"w": torch.arange(4.0), "step": 1}, url, storage_options=options)
    fs.pipe_file(f"{s3_bucket.name}/k/__1_0_deadbeef0000.distcp", b"killed rank's object")
    for key in ("k/__0_0_deadbeef0001.distcp", "k/sub/.metadata"):
        fs.call_s3("create_multipart_upload", Bucket=s3_bucket.name, Key=key)
    assert td.load_full(url, storage_options=options)["step"] == 1  # never visible
    td.save({"w": torch.arange(4.0) + 1, "step": 2}, url, storage_options=options)
    names = _objects(s3_bucket, "k")
    assert len(names) == 2 and ".metadata" in names, names
    assert _uploads(s3_bucket) == ["k/sub/.metadata"]  # another checkpoint's, deeper: kept
    assert td.load_full(url, storage_options=options)["step"] == 2


def _kill_run(bucket: S3Bucket, seed: int, timeout: float = 10.0) -> None:
    """Two ranks save every step to S3 in 5 MiB parts; one is SIGKILLed at a random moment."""
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    url = bucket.url(f"kill{seed}")
    port = dist_workers.free_port()
    procs = [ctx.Process(target=workers.kill_loop,
                         args=(r, 2, port, url, bucket.storage_options, reports, timeout))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        oks: dict[int, int] = {}
        deadline = time.monotonic() + 120
        while len(oks) < 2:  # both ranks committed at least once: then the kill
            kind, *rest = reports.get(timeout=max(1, deadline - time.monotonic()))
            assert kind == "ok", rest
            oks[rest[0]] = rest[1]
        time.sleep(rng.uniform(0.0, 0.5))  # staging, uploading parts, voting, committing
        victim = rng.randrange(2)
        os.kill(procs[victim].pid, signal.SIGKILL)
        while True:
            kind, *rest = reports.get(timeout=timeout + 30)
            if kind == "ok":
                oks[rest[0]] = rest[1]
            else:
                name, message, _, trace = rest
                break
        assert name == "CheckpointError", trace
        procs[1 - victim].join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    out = td.load_full(url, storage_options=bucket.storage_options)
    step = out["step"]
    assert step >= min(oks.values()), (step, oks)
    assert torch.all(out["sharded"] == step) and torch.all(out["replicated"] == step), "torn"
    assert out["sharded"].numel() == 2 * workers.KILL_NUMEL
    # The next commit (here one process) removes whatever the killed save left.
    td.save({"step": -1}, url, storage_options=bucket.storage_options)
    prefix = url.split("://", 1)[1].split("/", 1)[1]
    names = _objects(bucket, prefix)
    assert len(names) == 2 and ".metadata" in names, names
    assert [k for k in _uploads(bucket) if k.startswith(prefix + "/")] == []


@pytest.mark.multiprocess
def test_sigkill_of_a_rank_during_s3_saves_never_tears_and_leaves_nothing(
    s3_bucket: S3Bucket,
) -> None:
    _kill_run(s3_bucket, seed=0)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", range(1, 1 + int(os.environ.get("TORCHAUX_TEST_DIST_KILLS", "10"))))
def test_sigkill_s3_seeded_runs(s3_bucket: S3Bucket, seed: int) -> None:
    """10 seeded kills by default; ``TORCHAUX_TEST_DIST_KILLS=100`` for issue #13's count."""
    _kill_run(s3_bucket, seed)


def test_bad_locations_and_options_are_refused_before_any_io(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    sd = {"w": torch.ones(2)}
    options = s3_bucket.storage_options
    with pytest.raises(ValueError, match="only apply to URLs"):
        td.save_async(sd, tmp_path / "ck", storage_options=options)
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        td.save_async(sd, s3_bucket.url("ck"), storage_options=["anon"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not supported"):
        td.save_async(sd, "gcs://bucket/ck")
    with pytest.raises(ValueError, match="names no bucket"):
        td.load_full("s3://", storage_options=options)
    with pytest.raises(ValueError, match="does not exist"):
        td.save_async(sd, "s3://no-such-bucket-torchaux/ck", storage_options=options)
    with pytest.raises(TypeError, match="local directory or an s3:// URL"):
        td.load_full(b"s3://x/y")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="holds no committed distributed checkpoint"):
        td.load_full(s3_bucket.url("never"), storage_options=options)
    assert s3_bucket.keys() == []


def test_storage_writer_and_reader_with_dcp_on_s3(s3_bucket: S3Bucket) -> None:
    """DCP's own save/load driving torchaux's writer and reader on a URL (one process)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    url, options = s3_bucket.url("dcp/ck"), s3_bucket.storage_options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled"
        dcp.save({"w": torch.arange(6.0), "n": 3},
                 storage_writer=td.StorageWriter(url, storage_options=options))
        out: dict[str, Any] = {"w": torch.zeros(6), "n": 0}
        dcp.load(out, storage_reader=td.StorageReader(url, storage_options=options),
                 planner=td.SafeLoadPlanner())
    assert out["w"].tolist() == list(range(6)) and out["n"] == 3
