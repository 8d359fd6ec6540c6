"""Manager steps on an object store: one object per file, the metadata object written last.

S3 has no rename, so a step is committed by its commit marker: the state
object is uploaded first (it appears only once its multipart upload
completes, :mod:`torchaux.checkpoint.storage.remote`), then
``step-<N>/metadata.json``; a step without the marker is never listed (the
``commit_success`` rule of orbax and DCP's ``.metadata``,
ecosystem-anchors.md §3-4).  Deletion removes the marker first, so a step
being deleted disappears from listings at once.

A distributed step (every rank of a process group, :mod:`.sharded`) is a
:mod:`torchaux.distributed` checkpoint written straight under
``step-<N>/`` (no temp location: there is no rename); its own commit is its
``.metadata`` PUT, and rank 0 then writes ``step-<N>/metadata.json``
(:meth:`RemoteStore.publish_sharded`), the step's commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any, BinaryIO

from torchaux.checkpoint.storage import remote
from torchaux.manager.steps import (
    LATEST_NAME,
    METADATA_NAME,
    STATE_NAME,
    StepInfo,
    decode_metadata,
    encode_metadata,
    parse_step,
    step_name,
)

__all__ = ["RemoteStore"]


class RemoteStore:
    """The steps under one fsspec URL prefix (``s3://bucket/run``)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self._options = dict(storage_options or {})
        self.location = url.rstrip("/")
        self._fs, self._root = remote.filesystem(self.location, self._options)
        bucket, _, _ = self._fs.split_path(self._root)
        if not self._fs.exists(bucket):
            raise ValueError(
                f"checkpoint bucket {bucket!r} of {url!r} does not exist (or cannot be reached "
                "with these storage_options); create it first"
            )

    @property
    def options(self) -> dict[str, Any]:
        """The fsspec ``storage_options`` of this store."""
        return dict(self._options)

    def _key(self, step: int, name: str) -> str:
        return f"{self._root}/{step_name(step)}/{name}"

    def step_path(self, step: int) -> str:
        """The URL prefix of ``step`` (a distributed step's checkpoint location)."""
        return f"{self.location}/{step_name(step)}"

    def state_path(self, step: int) -> str:
        return f"{self.location}/{step_name(step)}/{STATE_NAME}"

    def state_target(self, step: int) -> str:
        return self.state_path(step)

    def discard(self, target: str) -> None:
        """Nothing was uploaded for a save that never reached the writer."""

    @contextlib.contextmanager
    def commit(self, target: str, info: StepInfo) -> Iterator[BinaryIO]:
        marker = self._key(info.step, METADATA_NAME)
        # Replacing a step (force): it stops being listed before its state changes.
        self._rm_quiet(marker)
        with remote.upload(target, self._options) as f:
            yield f
        self._fs.pipe_file(marker, encode_metadata(info))  # single PUT: atomic

    def sharded_target(self, step: int, token: str, n: int) -> str:
        """Where a distributed save of ``step`` writes: the step's own prefix (no rename on S3).

        Unlisted until :meth:`publish_sharded` writes the marker; its
        ``.metadata`` and data objects never disturb a committed step's until
        the distributed commit (new generation names, ``.metadata`` PUT last).
        """
        return self.step_path(step)

    def unlist(self, step: int) -> None:
        """Remove ``step``'s commit marker (a step about to be replaced stops being listed)."""
        self._rm_quiet(self._key(step, METADATA_NAME))

    def publish_sharded(self, target: str, info: StepInfo) -> None:
        """Rank 0, after the distributed commit under ``target``: the marker, one PUT: the commit."""
        if target != self.step_path(info.step):
            raise ValueError(f"{target!r} is not the prefix of step {info.step} in {self.location!r}")
        self._fs.pipe_file(self._key(info.step, METADATA_NAME), encode_metadata(info))

    def discard_sharded(self, target: str) -> None:
        """A distributed save into ``target`` failed: it is unlisted; remove what it left."""
        step = parse_step(target.rstrip("/").rsplit("/", 1)[-1])
        if step is None or target != self.step_path(step):
            raise ValueError(f"{target!r} is not a step prefix of {self.location!r}")
        self.delete(step)

    def _rm_quiet(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # absent already: the goal
            self._fs.rm_file(key)

    def _step_names(self) -> list[tuple[int, str]]:
        self._fs.invalidate_cache(self._root)  # listings are cached by s3fs
        try:
            entries = self._fs.ls(self._root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            step = parse_step(entry.rstrip("/").rsplit("/", 1)[-1])
            if step is not None:
                out.append((step, entry))
        return out

    def committed(self) -> list[StepInfo]:
        found = []
        for step, _ in self._step_names():
            try:
                info = decode_metadata(self._fs.cat_file(self._key(step, METADATA_NAME)), step_name(step))
            except FileNotFoundError:
                continue  # no commit marker: partial or being deleted
            if info is not None and info.step == step:
                found.append(info)
        return sorted(found, key=lambda i: i.step)

    def delete(self, step: int) -> None:
        self._rm_quiet(self._key(step, METADATA_NAME))
        prefix = f"{self._root}/{step_name(step)}"
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(prefix, recursive=True)
        self._fs.invalidate_cache(prefix)

    def remove_orphans(self, keep: Collection[str] = ()) -> list[str]:
        """Step prefixes without a commit marker, and unfinished uploads, of killed saves.

        Kept: the step prefixes (URLs) in ``keep``, distributed saves this
        process has in flight, and their uploads.
        """
        committed = {info.step for info in self.committed()}
        _, key_prefix, _ = self._fs.split_path(f"{self._root}/")
        base = self.location + "/"
        kept = [url[len(base):].rstrip("/") + "/" for url in keep if url.startswith(base)]

        def in_flight(key: str) -> bool:
            return any(key[len(key_prefix):].startswith(name) for name in kept)

        removed = remote.abort_uploads(self._fs, f"{self._root}/", keep=in_flight)
        for step, entry in self._step_names():
            if step not in committed and step_name(step) + "/" not in kept:
                self.delete(step)
                removed.append(entry)
        return removed

    def write_latest(self, step: int) -> None:
        self._fs.pipe_file(f"{self._root}/{LATEST_NAME}", f"{step}\n".encode())

    def open_state(self, step: int) -> BinaryIO:
        return remote.open_for_read(self.state_path(step), self._options)
