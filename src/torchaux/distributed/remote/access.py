"""A distributed checkpoint on an object store (``s3://bucket/prefix``): locating and reading it.

The layout is the one on disk (:mod:`.layout`): the checkpoint "directory" is
a key prefix, ``<prefix>/.metadata`` and the per-rank data objects
``<prefix>/__<rank>_<n>_<generation>.distcp`` sit directly under it, so stock
DCP's ``FsspecReader(url, **storage_options)`` reads an unencrypted torchaux
checkpoint and torchaux reads what ``FsspecWriter`` wrote.

* :func:`locate` - a checkpoint location (local path or fsspec URL) and its
  ``storage_options``, validated before any I/O;
* :class:`RemoteDir` - the checkpoint under one URL: its bucket checked once,
  ``.metadata`` read with the allow-list of :mod:`.metadata` and checked
  against the sizes of the objects (one listing), data objects opened for
  ranged reads (:class:`RangedFile`: each chunk fetched in pieces of
  ``TORCHAUX_UPLOAD_PART_BYTES``, at most ``TORCHAUX_UPLOAD_CONCURRENCY`` in
  flight, straight into the reader's buffer).

Writing and the commit are in :mod:`torchaux.distributed.writer` and :mod:`.commit`.

>>> locate("s3://bucket/run/step-1/", None, "load")[0]
's3://bucket/run/step-1'
>>> locate("/tmp/x", {"anon": True}, "load")
Traceback (most recent call last):
...
ValueError: storage_options only apply to URLs such as 's3://bucket/key'; got the local path '/tmp/x': drop storage_options or pass a URL
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from torchaux import _knobs
from torchaux.checkpoint.storage import remote
from torchaux.distributed.layout import METADATA_NAME
from torchaux.distributed.metadata import parse_metadata
from torchaux.errors import IntegrityError

__all__ = ["locate", "RemoteDir", "RangedFile"]


def locate(
    location: object, storage_options: object, who: str
) -> tuple[str, RemoteDir | None]:
    """``(path, remote)`` of a checkpoint location; ``remote`` is None for a local directory.

    A local path becomes absolute; a URL loses its trailing ``/``.  No request
    is made here.

    Raises:
        TypeError: ``location`` is not a str/PathLike, or ``storage_options`` not a dict.
        ValueError: ``storage_options`` with a local path; an unsupported
            protocol; a URL without a bucket.
        ImportError: fsspec/s3fs missing for a URL.
    """
    if not isinstance(location, (str, os.PathLike)):
        raise TypeError(
            f"{who}: the checkpoint location must be a local path or an s3:// URL (str or "
            f"os.PathLike); found {type(location).__name__}"
        )
    path = os.fspath(location)
    if isinstance(path, bytes):
        raise TypeError(f"{who}: the checkpoint location must be a str path; found bytes {path!r}")
    options = remote.check_storage_options(storage_options, path)
    if not remote.is_url(path):
        return os.path.abspath(path), None
    scheme, rest = path.split("://", 1)
    if not rest.strip("/"):
        raise ValueError(
            f"{who}: {location!r} names no bucket; pass a prefix such as 's3://bucket/run/step-100'"
        )
    url = f"{scheme}://{rest.rstrip('/')}"
    remote.filesystem(url, options)  # protocol and package checks, no request
    return url, RemoteDir(url, options)


class RemoteDir:
    """One distributed checkpoint under an fsspec URL prefix (picklable: no client held)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None) -> None:
        self.url = url
        self.options = dict(storage_options or {})
        self._seen: dict[str, int] = {}  # object sizes of the last metadata check

    def filesystem(self) -> tuple[Any, str]:
        """``(fs, root)``: fsspec's cached filesystem and the prefix without the protocol."""
        return remote.filesystem(self.url, self.options)

    def object_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def key(self, name: str) -> str:
        """``bucket/prefix/name``, the path fsspec calls take."""
        return f"{self.filesystem()[1]}/{name}"

    def check_bucket(self, who: str) -> None:
        """The bucket exists (one request the first time per bucket and process)."""
        remote.check_target(self.object_url(METADATA_NAME), self.options, who)

    def sizes(self) -> dict[str, int]:
        """Name -> size of every object directly under the prefix (one fresh listing)."""
        fs, root = self.filesystem()
        fs.invalidate_cache(root)
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            if entry.get("type") == "file":
                out[entry["name"].rstrip("/").rsplit("/", 1)[-1]] = int(entry["size"])
        return out

    def read_metadata(self, *, check_sizes: bool = True) -> Metadata:
        """Unpickle ``.metadata`` with the allow-list and check it (as :func:`.metadata.read_metadata`).

        Raises:
            FileNotFoundError: no committed checkpoint under the prefix.
            IntegrityError: the object is damaged, or a data object is shorter
                than the chunks placed in it.
            UnsupportedFormatError: it names types outside the allow-list.
        """
        fs, root = self.filesystem()
        where = self.object_url(METADATA_NAME)
        try:
            raw = fs.cat_file(f"{root}/{METADATA_NAME}")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{where} does not exist: {self.url!r} holds no committed distributed "
                "checkpoint (a save that never committed leaves none); pass the URL given to save"
            ) from None
        if check_sizes:
            self._seen = self.sizes()
            return parse_metadata(raw, where, self._seen.get)
        return parse_metadata(raw, where)

    def open(self, name: str) -> RangedFile:
        """The data object ``name`` for ranged reads (its size from the metadata check's listing).

        Raises:
            FileNotFoundError: there is no such object.
        """
        fs, root = self.filesystem()
        path = f"{root}/{name}"
        size = self._seen.get(name)
        if size is None:
            try:
                size = int(fs.info(path)["size"])
            except FileNotFoundError:
                raise FileNotFoundError(self.object_url(name)) from None
        return RangedFile(fs, path, size, self.object_url(name))


class RangedFile(io.RawIOBase):
    """A read-only, seekable view of one object: each ``readinto`` is ranged GETs.

    The range is fetched in pieces (``TORCHAUX_UPLOAD_PART_BYTES``) with up to
    ``TORCHAUX_UPLOAD_CONCURRENCY`` in flight on fsspec's I/O loop, each copied
    into the caller's buffer when it arrives: the extra memory is bounded by
    those two knobs whatever the chunk's size.  No ``fileno``: readers that
    need a descriptor take their general path.
    """

    def __init__(self, fs: Any, path: str, size: int, url: str) -> None:
        super().__init__()
        self._fs, self._path, self._size, self._url = fs, path, size, url
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _fetch(self, start: int, end: int) -> Future[bytes]:
        coro = self._fs._cat_file(self._path, start=start, end=end)
        return asyncio.run_coroutine_threadsafe(coro, self._fs.loop)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        if not want:
            return 0
        piece = max(1 << 20, _knobs.upload_part_bytes())
        concurrency = _knobs.upload_concurrency()
        pending: collections.deque[tuple[int, Future[bytes]]] = collections.deque()
        got = 0
        starts = iter(range(0, want, piece))
        try:
            for at in starts:
                pending.append((at, self._fetch(self._pos + at, self._pos + min(at + piece, want))))
                if len(pending) >= concurrency:
                    got += self._land(view, *pending.popleft())
            while pending:
                got += self._land(view, *pending.popleft())
        finally:
            for _, fut in pending:  # a failed piece: do not leave the others running
                fut.cancel()
        self._pos += got
        return got

    def _land(self, view: memoryview, at: int, fut: Future[bytes]) -> int:
        try:
            data = fut.result()
        except FileNotFoundError:
            raise IntegrityError(
                f"data object {self._url} disappeared while it was read (a newer save of the "
                "same checkpoint replaced it?); load again"
            ) from None
        view[at:at + len(data)] = data
        return len(data)
