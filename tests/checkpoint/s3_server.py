"""A real S3 server on this machine for the remote-storage tests: moto in server mode.

moto's ``ThreadedMotoServer`` serves the S3 REST API over HTTP on 127.0.0.1
(a random free port); clients talk to it through s3fs/aiobotocore exactly as
to AWS, with fake credentials.  No traffic leaves the machine.  One server
per test session; every test gets its own fresh bucket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

#: Fake credentials: moto accepts any, and nothing here may reach a real account.
FAKE_KEY = "testing"
FAKE_SECRET = "testing"


@dataclass
class S3Bucket:
    """A fresh bucket on the local S3 server."""

    name: str
    endpoint: str
    storage_options: dict[str, Any]
    fs: Any

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    def keys(self) -> list[str]:
        """Every object in the bucket (fresh listing), without the bucket name."""
        self.fs.invalidate_cache()
        return sorted(p.split("/", 1)[1] for p in self.fs.find(self.name))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    pytest.importorskip("s3fs", reason="remote tests need the test extra: pip install -e '.[test]'")
    server_mod = pytest.importorskip("moto.server", reason="needs moto[server] (test extra)")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never probe a metadata service
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # moto's default; botocore needs one
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def storage_options_for(endpoint: str) -> dict[str, Any]:
    """fsspec options that point s3fs at ``endpoint`` with the fake credentials."""
    return {
        "key": FAKE_KEY, "secret": FAKE_SECRET,
        "client_kwargs": {"endpoint_url": endpoint},
    }


@contextlib.contextmanager
def new_bucket(endpoint: str) -> Iterator[S3Bucket]:
    """A new, empty bucket on the server at ``endpoint``, deleted with its objects afterwards."""
    import s3fs

    options = storage_options_for(endpoint)
    fs = s3fs.S3FileSystem(**options)
    name = f"torchaux-{secrets.token_hex(6)}"
    fs.mkdir(name)
    try:
        yield S3Bucket(name, endpoint, options, fs)
    finally:
        fs.invalidate_cache()
        fs.rm(name, recursive=True)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[S3Bucket]:
    """A new, empty bucket on the local S3 server, per test."""
    with new_bucket(s3_endpoint) as bucket:
        yield bucket
