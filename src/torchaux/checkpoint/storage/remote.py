"""Checkpoints on object stores through fsspec: a streaming multipart upload that commits atomically.

fsspec URLs (``s3://bucket/key.pt``) with ``storage_options`` passed to
``fsspec.core.url_to_fs`` are the convention of DCP's ``FsspecWriter``,
Lightning and Hugging Face (ecosystem-anchors.md §4).  Object stores have no
rename, so the commit is the store's own: an S3 object becomes visible only
when its ``PutObject`` or ``CompleteMultipartUpload`` succeeds (AWS S3 user
guide, "Uploading and copying objects using multipart upload": "the object is
not visible until the upload is complete").  A failed or killed save leaves no
object (an aborted or abandoned multipart upload is invisible to listing and
reads), and the previous object at the key stays as it was.

:class:`MultipartWriter` is the write-only file the serializer writes into:
bytes are copied into part buffers of ``TORCHAUX_UPLOAD_PART_BYTES``; a full
buffer is uploaded as one part on fsspec's I/O loop while the writer fills
the next, with at most ``TORCHAUX_UPLOAD_CONCURRENCY`` parts in flight.  Extra
memory is therefore ``(concurrency + 1) * part_bytes`` whatever the size of
the checkpoint; the staged snapshot is never copied as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, BinaryIO

from torchaux import _knobs

__all__ = [
    "is_url", "filesystem", "check_target", "check_storage_options", "upload",
    "MultipartWriter", "open_for_read", "sink_for", "abort_uploads",
]

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
#: Protocols with single-object atomicity that :class:`MultipartWriter` drives.
S3_PROTOCOLS = ("s3", "s3a")
#: S3's smallest part other than the last (AWS S3 "Multipart upload limits": 5 MiB).
MIN_PART_BYTES = 5 << 20
#: S3's largest part number (same table: 10,000 parts).
MAX_PARTS = 10_000
_checked_buckets: set[tuple[int, str]] = set()

# Part buffers of finished uploads, kept for the next one (as direct_io keeps its
# buffers): a fresh 16 MiB bytearray costs 4096 page faults on first write.
_spare_lock = threading.Lock()
_spare: dict[int, list[bytearray]] = {}


def _take_buffer(size: int) -> bytearray:
    with _spare_lock:
        free = _spare.get(size)
        if free:
            return free.pop()
    return bytearray(size)


def _keep_buffers(size: int, buffers: list[bytearray], limit: int) -> None:
    with _spare_lock:
        free = _spare.setdefault(size, [])
        free.extend(buffers[: max(0, limit - len(free))])


def is_url(target: object) -> bool:
    """Whether ``target`` is an fsspec URL (``scheme://...``) rather than a local path.

    >>> is_url("s3://bucket/a.pt"), is_url("/tmp/a.pt"), is_url(b"s3://x")
    (True, False, False)
    """
    return isinstance(target, str) and _URL_RE.match(target) is not None


def check_storage_options(storage_options: object, target: object) -> dict[str, Any]:
    """Refuse ``storage_options`` that are not a dict, or that come with a local path."""
    if storage_options is None:
        return {}
    if not isinstance(storage_options, Mapping) or not all(isinstance(k, str) for k in storage_options):
        raise TypeError(
            "storage_options must be a dict of fsspec options (e.g. {'client_kwargs': "
            "{'endpoint_url': ...}}); got " + type(storage_options).__name__
        )
    if not is_url(target):
        raise ValueError(
            f"storage_options only apply to URLs such as 's3://bucket/key'; got the local path "
            f"{target!r}: drop storage_options or pass a URL"
        )
    return dict(storage_options)


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` for ``url``; fsspec caches the filesystem by its options.

    Raises:
        ImportError: fsspec (or the protocol's package, e.g. s3fs) is missing.
        ValueError: the protocol is not an object store torchaux can commit to.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme not in S3_PROTOCOLS:
        raise ValueError(
            f"{url!r}: torchaux commits remote checkpoints atomically on S3-compatible stores "
            f"({', '.join(p + '://' for p in S3_PROTOCOLS)}); '{scheme}://' is not supported, "
            "use a local path or an s3:// URL"
        )
    try:
        import fsspec.core
        import s3fs  # noqa: F401 - the protocol's implementation
    except ImportError:
        raise ImportError(
            f"{url!r} needs fsspec and s3fs: pip install 'torchaux[s3]'"
        ) from None
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def check_target(url: str, storage_options: Mapping[str, Any] | None, who: str) -> str:
    """Validate a remote save target before any work: a key inside an existing bucket.

    The bucket check costs one request the first time a bucket is seen per
    filesystem, and is remembered after that (it is on the caller's thread).
    """
    fs, path = filesystem(url, storage_options)
    bucket, key, _ = fs.split_path(path)
    if not key or key.endswith("/") or url.endswith("/"):
        raise ValueError(
            f"{who} target {url!r} names no object; pass a key such as 's3://{bucket}/model.pt'"
        )
    if (id(fs), bucket) not in _checked_buckets:
        if not fs.exists(bucket):
            raise ValueError(
                f"{who} target bucket {bucket!r} does not exist (or cannot be reached with "
                "these storage_options); create it first"
            )
        _checked_buckets.add((id(fs), bucket))
    return url


def _await(fs: Any, coro: Any) -> Future[Any]:
    return asyncio.run_coroutine_threadsafe(coro, fs.loop)


class MultipartWriter(io.RawIOBase):
    """A write-only file that uploads to one S3 object in parts; :meth:`commit` publishes it.

    Nothing is visible at the key until :meth:`commit` returns; :meth:`abort`
    (or any failure) discards the parts.  A part upload's failure is raised by
    the next ``write`` or by ``commit``.
    """

    def __init__(
        self, fs: Any, path: str, *, part_bytes: int | None = None, concurrency: int | None = None
    ) -> None:
        super().__init__()
        self._fs = fs
        self._bucket, self._key, _ = fs.split_path(path)
        size = _knobs.upload_part_bytes() if part_bytes is None else part_bytes
        self._part_bytes = max(MIN_PART_BYTES, size)
        self._concurrency = max(1, _knobs.upload_concurrency() if concurrency is None else concurrency)
        self._buffers_made = 1
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buf = _take_buffer(self._part_bytes)
        self._all: list[bytearray] = [self._buf]
        self._fill = 0
        self._upload_id: str | None = None
        self._parts: list[Future[Any]] = []
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        pos = 0
        while pos < n:
            take = min(n - pos, self._part_bytes - self._fill)
            self._buf[self._fill:self._fill + take] = view[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self._part_bytes:
                self._send_full()
        return n

    def _call(self, method: str, **kwargs: Any) -> Future[Any]:
        return _await(self._fs, self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs))

    def _raise_failed_parts(self) -> None:
        for part in self._parts:
            if part.done() and part.exception() is not None:
                raise part.exception()  # type: ignore[misc]

    def _send_full(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload").result()["UploadId"]
        if len(self._parts) >= MAX_PARTS:
            raise ValueError(
                f"upload to s3://{self._bucket}/{self._key} needs more than {MAX_PARTS} parts; "
                "raise TORCHAUX_UPLOAD_PART_BYTES"
            )
        self._raise_failed_parts()
        buf = self._buf
        part = self._call(
            "upload_part", UploadId=self._upload_id, PartNumber=len(self._parts) + 1, Body=buf,
        )
        part.add_done_callback(lambda _: self._free.put(buf))
        self._parts.append(part)
        if self._buffers_made <= self._concurrency:
            self._buffers_made += 1
            self._buf = _take_buffer(self._part_bytes)
            self._all.append(self._buf)
        else:
            self._buf = self._free.get()  # back-pressure: at most `concurrency` in flight
        self._fill = 0

    def commit(self) -> None:
        """Upload the rest and publish the object atomically."""
        if self._done:
            raise ValueError("this upload is already committed or aborted")
        self._done = True
        if self._upload_id is None:  # small object: one PUT, atomic by itself
            self._call("put_object", Body=self._buf[:self._fill]).result()
        else:
            if self._fill:
                last = self._buf[:self._fill]  # a copy: the buffer goes back to the pool
                self._parts.append(self._call(
                    "upload_part", UploadId=self._upload_id, PartNumber=len(self._parts) + 1,
                    Body=last,
                ))
            etags = [{"PartNumber": i + 1, "ETag": p.result()["ETag"]} for i, p in enumerate(self._parts)]
            self._call(
                "complete_multipart_upload", UploadId=self._upload_id,
                MultipartUpload={"Parts": etags},
            ).result()
        self._fs.invalidate_cache(f"{self._bucket}/{self._key}")
        self._release()

    def abort(self) -> None:
        """Discard every part; nothing becomes visible.  Waits for parts in flight."""
        self._done = True
        for part in self._parts:
            with contextlib.suppress(BaseException):  # the save's own error is raised instead
                part.result()
        if self._upload_id is not None:
            self._call("abort_multipart_upload", UploadId=self._upload_id).result()
        self._release()

    def _release(self) -> None:
        # Every part has finished (commit and abort wait for them): no request
        # still reads these buffers, so the next upload may reuse them.
        self._parts.clear()
        _keep_buffers(self._part_bytes, self._all, self._concurrency + 1)
        self._all = []
        self._buf = bytearray()
        while not self._free.empty():
            self._free.get()


@contextlib.contextmanager
def upload(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Open ``url`` for writing; the object appears, complete, only on clean exit.

    The remote counterpart of :func:`~torchaux.checkpoint.storage.commit.atomic_write`
    (same contract, so it is a sink for :class:`~torchaux.AsyncSaver`).

    Raises:
        Whatever writing raised, after the multipart upload was aborted.
    """
    fs, path = filesystem(url, storage_options)
    writer = MultipartWriter(fs, path)
    try:
        yield writer  # type: ignore[misc]
        writer.commit()
    except BaseException as exc:
        try:
            writer.abort()
        except Exception as abort_exc:  # the write's error matters more; report both
            if hasattr(exc, "add_note"):
                exc.add_note(f"aborting the multipart upload also failed: {abort_exc!r}")
        raise


def sink_for(path: str, sink: Any, storage_options: Mapping[str, Any] | None) -> Any:
    """The sink a save to ``path`` uses: the remote upload for URLs on the default sink."""
    from torchaux.checkpoint.storage.commit import atomic_write

    if is_url(path) and sink is atomic_write:
        return lambda target: upload(target, storage_options)
    return sink


def open_for_read(url: str, storage_options: Mapping[str, Any] | None = None) -> BinaryIO:
    """The whole object at ``url`` as a seekable binary file (one GET).

    Raises:
        ValueError: there is no object at ``url``.
    """
    fs, path = filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {url!r} does not exist (no such object)") from None
    return io.BytesIO(data)


def abort_uploads(fs: Any, prefix: str, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Abort the unfinished multipart uploads under ``prefix`` (``bucket/key-prefix``).

    A killed save leaves its parts on the server, invisible but stored (and
    billed on AWS) until aborted.  Call only when nobody is uploading there;
    uploads whose key ``keep(key)`` accepts are left alone (saves still running).

    Returns:
        ``bucket/key`` of each upload aborted.
    """
    bucket, key_prefix, _ = fs.split_path(prefix)
    listed = _await(fs, fs._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix)).result()
    aborted = []
    for up in listed.get("Uploads", []):
        if keep is not None and keep(up["Key"]):
            continue
        _await(fs, fs._call_s3(
            "abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"],
        )).result()
        aborted.append(f"{bucket}/{up['Key']}")
    return aborted
