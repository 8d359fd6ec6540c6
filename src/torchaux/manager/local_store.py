"""Manager steps on a local file system: temp directory, then one atomic rename.

A step is written into ``.step-<N>.torchaux-tmp-<pid>-<token>/`` beside its
final name (the state file through the engine's atomic, fsynced commit, then
the metadata file), and published with one directory rename
(:func:`~torchaux.checkpoint.storage.directory.publish_directory`); deletion
renames it away first (:func:`~torchaux.checkpoint.storage.retire.retire_directory`).
A distributed step (every rank of a process group saving its shards) is
written by :func:`torchaux.distributed.save_async` into
``.step-<N>.torchaux-tmp-dist_<token>_<n>/`` - a name every rank derives alike
(:meth:`LocalStore.sharded_target`); after the distributed commit rank 0 adds
the metadata file and publishes it with the same rename
(:meth:`LocalStore.publish_sharded`).
Every rename and delete goes through :mod:`torchaux.checkpoint.storage`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from typing import BinaryIO

from torchaux.checkpoint.storage.commit import TEMP_MARKER, atomic_write, fsync_directory
from torchaux.checkpoint.storage.directory import publish_directory, remove_stale, remove_tree
from torchaux.checkpoint.storage.retire import make_temp_dir, retire_directory
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

__all__ = ["LocalStore"]


def _make_durable_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, then fsync the parent of every folder it created.

    Without it a power loss after the first save returned could drop the new
    run directory's entry, and the run with it
    (tests/manager/test_manager_crash_states.py).
    """
    missing = []
    head = path
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    os.makedirs(path, exist_ok=True)
    for created in missing:  # deepest first; each parent now holds its entry
        fsync_directory(os.path.dirname(created))


class LocalStore:
    """The steps under one local directory (created if missing).

    Example:
        >>> store = LocalStore(os.path.join(doctest_tmp, "run"))
        >>> target = store.state_target(1)
        >>> with store.commit(target, StepInfo(1, {"loss": 0.5})) as f:
        ...     _ = f.write(b"state")
        >>> store.committed()
        [StepInfo(step=1, metrics={'loss': 0.5}, encrypted=None, layout='file')]
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # realpath: the engine resolves links in targets, and the manager matches
        # the paths it hands out against the ones the writer gets back.
        path = os.path.realpath(os.fsdecode(directory))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(
                f"checkpoint directory {path!r} exists and is not a directory; pass a folder"
            )
        try:
            _make_durable_dirs(path)
        except OSError as exc:
            raise ValueError(
                f"checkpoint directory {path!r} cannot be created ({exc.strerror}); "
                "pass a writable folder"
            ) from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(
                f"checkpoint directory {path!r} is not writable by this process; "
                "fix its permissions or pass another folder"
            )
        self.location = path

    def step_path(self, step: int) -> str:
        return os.path.join(self.location, step_name(step))

    def state_path(self, step: int) -> str:
        """The state file of a committed step."""
        return os.path.join(self.step_path(step), STATE_NAME)

    def state_target(self, step: int) -> str:
        """Create the step's temp directory; return the state file path to save to."""
        return os.path.join(make_temp_dir(self.step_path(step)), STATE_NAME)

    def discard(self, target: str) -> None:
        """Remove the temp directory of a save that never reached the writer."""
        remove_tree(os.path.dirname(target))

    @contextlib.contextmanager
    def commit(self, target: str, info: StepInfo) -> Iterator[BinaryIO]:
        """Sink for ``target`` (from :meth:`state_target`): on clean exit the step is committed."""
        tmp = os.path.dirname(target)
        try:
            with atomic_write(target) as f:
                yield f
            with atomic_write(os.path.join(tmp, METADATA_NAME)) as m:
                m.write(encode_metadata(info))
            publish_directory(tmp, self.step_path(info.step))
        except BaseException:
            remove_tree(tmp)  # a temp folder: no reader ever took it for a step
            raise

    def sharded_target(self, step: int, token: str, n: int) -> str:
        """The temp directory of the manager's ``n``-th distributed save (same name on every rank).

        No dashes after the marker, so it never looks like this process's
        ``-<pid>-`` temps to :meth:`remove_orphans`.

        >>> os.path.basename(LocalStore(doctest_tmp).sharded_target(7, "ab12", 3))
        '.step-7.torchaux-tmp-dist_ab12_3'
        """
        return os.path.join(self.location, f".{step_name(step)}{TEMP_MARKER}dist_{token}_{n}")

    def publish_sharded(self, tmp: str, info: StepInfo) -> None:
        """Rank 0, after the distributed commit in ``tmp``: write the marker, rename into place."""
        with atomic_write(os.path.join(tmp, METADATA_NAME)) as m:
            m.write(encode_metadata(info))
        publish_directory(tmp, self.step_path(info.step))

    def committed(self) -> list[StepInfo]:
        """Every committed step, oldest first (the truth; ``latest`` is only a hint)."""
        found = []
        for name in os.listdir(self.location):
            step = parse_step(name)
            if step is None:
                continue
            try:
                with open(os.path.join(self.location, name, METADATA_NAME), "rb") as f:
                    info = decode_metadata(f.read(), name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # not written by a manager commit
            if info is not None and info.step == step:
                found.append(info)
        return sorted(found, key=lambda i: i.step)

    def delete(self, step: int) -> None:
        retire_directory(self.step_path(step))

    def remove_orphans(self, keep: Collection[str] = ()) -> list[str]:
        """Temp directories and files of crashed saves and deletions.

        Kept: this process's own temps (``-<pid>-`` in the name: it may be
        writing them now) and the paths in ``keep`` (distributed saves this
        process has in flight).
        """
        removed = []
        own = f"-{os.getpid()}-"
        for name in sorted(os.listdir(self.location)):
            full = os.path.join(self.location, name)
            if TEMP_MARKER not in name or full in keep:
                continue
            if own in "-" + name.split(TEMP_MARKER, 1)[1]:
                continue
            remove_tree(full)  # a missing entry (removed meanwhile) is fine
            removed.append(full)
        # remove_stale: folders a replacing publish renamed aside (".torchaux-old-").
        return removed + remove_stale(self.location, [])

    def write_latest(self, step: int) -> None:
        with atomic_write(os.path.join(self.location, LATEST_NAME)) as f:
            f.write(f"{step}\n".encode())

    def open_state(self, step: int) -> BinaryIO:
        return open(self.state_path(step), "rb")
