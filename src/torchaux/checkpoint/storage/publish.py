"""Directory-level commit: publish staged files into a checkpoint directory, clean leftovers.

:mod:`.commit` makes one *file* appear atomically.  A sharded checkpoint is a
directory of files (one or more per rank) plus one index file whose atomic
replacement is the commit point (DCP's ``.metadata``).  This module supplies
the steps around that rename, in this order (tested in
tests/checkpoint/storage/test_publish.py):

1. :func:`make_staging_dir` - every writer puts its files into a hidden
   ``.torchaux-tmp-<generation>`` folder inside the checkpoint directory, which
   no reader takes for a checkpoint (readers open only what the index names);
2. :func:`publish_files` - after every writer succeeded, move the staged files
   into the checkpoint directory under names no committed index uses yet
   (a new generation never overwrites the data of the previous one), then
   ``fsync`` the directory;
3. the caller commits the index with :func:`.commit.atomic_write`
   (temp, fsync, ``os.replace``, directory fsync);
4. :func:`remove_unreferenced` - delete data files the committed index does not
   name, every staging folder except those still in use, and the temp files
   of writers that no longer run (an index commit a crash cut short).

A crash between any two steps leaves the previous index pointing at its own,
untouched files; what the crash left behind is removed by step 4 of the next
save.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Collection, Iterable

from torchaux import _knobs
from torchaux.checkpoint.storage import commit

__all__ = [
    "STAGING_PREFIX",
    "make_staging_dir",
    "publish_files",
    "remove_unreferenced",
    "fsync_directory",
]

#: Name prefix of the folders writers stage their files in (never a committed name).
STAGING_PREFIX = ".torchaux-tmp-"

_GENERATION = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def fsync_directory(directory: str) -> None:
    """Make renames and unlinks inside ``directory`` durable, unless ``TORCHAUX_FSYNC=0``.

    >>> fsync_directory(doctest_tmp)
    """
    if _knobs.fsync_enabled():
        commit.fsync_directory(directory)


def make_staging_dir(checkpoint_dir: str, generation: str) -> str:
    """Create (if needed) and return the staging folder of ``generation``.

    Safe to call from several processes at once (shared file systems included).

    >>> d = make_staging_dir(os.path.join(doctest_tmp, "ck"), "g1")
    >>> os.path.basename(d)
    '.torchaux-tmp-g1'
    """
    if not _GENERATION.match(generation):
        raise ValueError(
            f"generation must be 1-64 letters, digits, '-' or '_'; found {generation!r}"
        )
    path = os.path.join(checkpoint_dir, STAGING_PREFIX + generation)
    os.makedirs(path, exist_ok=True)
    return path


def publish_files(staging_dir: str, checkpoint_dir: str, names: Iterable[str]) -> None:
    """Move ``names`` from ``staging_dir`` into ``checkpoint_dir``, then fsync it and its parent.

    The names must not exist in ``checkpoint_dir`` yet: a published file never
    replaces one a committed index may point at.  The parent is fsynced too
    because the checkpoint directory itself may be new (a first save): without
    it a power loss after the commit could drop the whole directory
    (tests/distributed/test_dist_crash_states.py found that state).

    Raises:
        FileExistsError: a target name is already taken.
        FileNotFoundError: a staged file is missing (its writer did not finish).
    """
    for name in names:
        if os.sep in name or name.startswith("."):
            raise ValueError(f"data file names must be plain and visible; found {name!r}")
        target = os.path.join(checkpoint_dir, name)
        if os.path.lexists(target):
            raise FileExistsError(
                f"{target} already exists; a new checkpoint generation must use new file "
                "names so the committed one stays intact"
            )
        os.rename(os.path.join(staging_dir, name), target)
    fsync_directory(checkpoint_dir)
    fsync_directory(os.path.dirname(os.path.abspath(checkpoint_dir)))


def remove_unreferenced(
    checkpoint_dir: str,
    *,
    keep: Collection[str],
    data_suffix: str,
    keep_staging: Collection[str] = (),
) -> list[str]:
    """Delete data files not in ``keep``, staging folders not in ``keep_staging``, stale temps.

    Only names ending in ``data_suffix``, staging folders and temp files of
    processes that no longer exist (:func:`.commit.remove_stale_temps`: e.g.
    the index's temp file when a crash cut its commit short) are considered;
    everything else in the directory (the index, user files) is left alone.

    Returns:
        The paths removed.

    Example:
        >>> d = os.path.join(doctest_tmp, "rm")
        >>> _ = make_staging_dir(d, "old")
        >>> for n in ("a.distcp", "b.distcp", "notes.txt"):
        ...     open(os.path.join(d, n), "wb").close()
        >>> sorted(os.path.basename(p) for p in remove_unreferenced(d, keep={"a.distcp"}, data_suffix=".distcp"))
        ['.torchaux-tmp-old', 'b.distcp']
    """
    removed = []
    for name in os.listdir(checkpoint_dir):
        full = os.path.join(checkpoint_dir, name)
        if name.startswith(STAGING_PREFIX):
            if name[len(STAGING_PREFIX):] in keep_staging:
                continue
            shutil.rmtree(full, ignore_errors=False, onerror=_ignore_missing)
            removed.append(full)
        elif name.endswith(data_suffix) and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
                removed.append(full)
    removed += commit.remove_stale_temps(checkpoint_dir)
    if removed:
        fsync_directory(checkpoint_dir)
    return removed


def _ignore_missing(func: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
    # Another process may clean the same leftovers at the same time.
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
