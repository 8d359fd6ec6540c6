"""CheckpointManager of 2 spawned gloo ranks on S3 (moto on 127.0.0.1).

Tests the object-store paths of src/torchaux/manager/sharded.py and
remote_store.py: distributed steps written under ``step-<N>/`` with the
commit marker last, retention, replacing a step, encryption, a failed rank,
the orphans of killed saves removed at start-up, a restart resuming from the
newest step into FSDP2 shards, and one plain process restoring it whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import manager_dist_workers as mdw
import s3_manager_workers as workers
import torchaux
from s3_server import S3Bucket, new_bucket
from torchaux.checkpoint.storage import remote
from torchaux.manager.steps import METADATA_NAME

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> Iterator[S3Bucket]:
    """One bucket for the module's 2-rank runs (s3_bucket is per test)."""
    with new_bucket(s3_endpoint) as b:
        yield b


def _uploads(bucket: S3Bucket, prefix: str) -> list[str]:
    fs, _ = remote.filesystem(bucket.url("x"), bucket.storage_options)
    listed = fs.call_s3("list_multipart_uploads", Bucket=bucket.name, Prefix=prefix)
    return sorted(u["Key"] for u in listed.get("Uploads", []))


def _under(bucket: S3Bucket, prefix: str) -> list[str]:
    return [k[len(prefix) + 1:] for k in bucket.keys() if k.startswith(prefix + "/")]


@pytest.fixture(scope="module")
def first_run(bucket: S3Bucket, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded_s3")
    # A killed distributed save: a step prefix without marker, and an open multipart upload.
    bucket.fs.pipe_file(f"{bucket.name}/m/run/step-9/__0_0_dead00000000.distcp", b"killed")
    bucket.fs.call_s3("create_multipart_upload", Bucket=bucket.name,
                      Key="m/run/step-9/__1_0_dead00000000.distcp")
    workers.run("first_run", 2, bucket.url("m"), bucket.storage_options, str(root))
    return root


def test_retention_markers_and_no_leftovers(first_run: Path, bucket: S3Bucket) -> None:
    names = _under(bucket, "m/run")
    tops = sorted({n.split("/", 1)[0] for n in names})
    assert tops == ["latest", "step-2", "step-6", "step-8"], tops  # step-9's orphans gone
    assert bucket.fs.cat_file(f"{bucket.name}/m/run/latest") == b"8\n"
    for step in ("step-2", "step-6", "step-8"):
        inside = {n.split("/", 1)[1] for n in names if n.startswith(step + "/")}
        data = inside - {".metadata", METADATA_NAME}
        assert len(inside) == 4 and len(data) == 2, inside  # one generation: the old one's gone
        assert all(n.endswith(".distcp") for n in data), inside
    meta = json.loads(bucket.fs.cat_file(f"{bucket.name}/m/run/step-2/{METADATA_NAME}"))
    assert meta["layout"] == "distributed" and meta["metrics"] == {"loss": 0.1}
    meta = json.loads(bucket.fs.cat_file(f"{bucket.name}/m/run/step-6/{METADATA_NAME}"))
    assert meta["metrics"] == {"loss": 0.6}  # the replacement's
    assert _uploads(bucket, "m/") == []


def test_encrypted_step_and_failed_rank(first_run: Path, bucket: S3Bucket) -> None:
    meta = json.loads(bucket.fs.cat_file(f"{bucket.name}/m/enc/step-0/{METADATA_NAME}"))
    assert meta["encrypted"] == "AES-GCM" and meta["layout"] == "distributed"
    tops = sorted({n.split("/", 1)[0] for n in _under(bucket, "m/fail")})
    assert tops == ["latest", "step-1", "step-3"], tops  # the failed step 2 left nothing


def test_new_processes_resume_from_the_newest_step(first_run: Path, bucket: S3Bucket) -> None:
    workers.run("resume", 2, bucket.url("m"), bucket.storage_options, str(first_run))


def test_one_process_restores_the_two_rank_step(first_run: Path, bucket: S3Bucket) -> None:
    expected = torch.load(first_run / "expected.pt", weights_only=True)
    with torchaux.CheckpointManager(bucket.url("m/run"), keep_latest=None,
                                    storage_options=bucket.storage_options) as mgr:
        assert mgr._sharded is None and mgr.latest_step() == 8
        mdw.assert_same(expected, mgr.restore())  # whole, at the global shapes
        plain = mdw.full(expected)
        for value in plain["model"].values():
            value.zero_()
        plain["tp"].zero_()
        assert mgr.restore(8, state=plain) is plain  # in place, from 2 shards into 1
        mdw.assert_same(expected["model"], plain["model"])
        assert torch.equal(expected["tp"], plain["tp"])
