"""Temp directories for checkpoint folders, and retiring a published folder atomically.

:mod:`.directory` publishes a complete folder with one rename.  A manager
step also has to be *built* somewhere no reader looks, and *deleted* without a
reader ever seeing half of it:

* :func:`make_temp_dir` creates ``.<name>.torchaux-tmp-<pid>-<token>`` beside
  the final name (same file system, so the publishing rename is atomic); the
  name carries :data:`~torchaux.checkpoint.storage.commit.TEMP_MARKER`, which
  no committed name contains;
* :func:`retire_directory` renames a published folder to such a temp name
  first (rename(2) is atomic: readers see the folder under its name or not at
  all) and only then deletes it, so a crash half-way through a deletion leaves
  a temp folder, never a half-deleted checkpoint under its real name;
* :func:`remove_stale_temp_dirs` deletes what crashed saves and deletions left.
"""

from __future__ import annotations

import contextlib
import os
import secrets

from torchaux import _knobs
from torchaux.checkpoint.storage.commit import TEMP_MARKER, fsync_directory
from torchaux.checkpoint.storage.directory import remove_tree

__all__ = ["make_temp_dir", "retire_directory", "remove_stale_temp_dirs"]


def _temp_name(final: str, purpose: str) -> str:
    directory, name = os.path.split(os.path.abspath(final))
    return os.path.join(
        directory, f".{name}{TEMP_MARKER}{purpose}{os.getpid()}-{secrets.token_hex(4)}"
    )


def make_temp_dir(final: str) -> str:
    """Create and return an empty private temp directory beside ``final``.

    >>> tmp = make_temp_dir(os.path.join(doctest_tmp, "step-1"))
    >>> os.path.basename(tmp).startswith(".step-1.torchaux-tmp-")
    True
    """
    tmp = _temp_name(final, "")
    os.mkdir(tmp, 0o700)
    return tmp


def retire_directory(path: str) -> None:
    """Delete the published folder ``path``: renamed away first (atomic), then removed.

    >>> d = os.path.join(doctest_tmp, "step-3")
    >>> os.mkdir(d)
    >>> retire_directory(d)
    >>> os.path.exists(d), os.listdir(doctest_tmp)
    (False, [])
    """
    aside = _temp_name(path, "del-")
    os.rename(path, aside)  # from here on no reader can take it for a checkpoint
    if _knobs.fsync_enabled():
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    remove_tree(aside)


def remove_stale_temp_dirs(directory: str, *, other_pids_only: bool = True) -> list[str]:
    """Delete temp folders and files that crashed saves or deletions left in ``directory``.

    Args:
        directory: the folder holding the checkpoint folders.
        other_pids_only: keep this process's temps (it may be writing them now).

    Returns:
        The paths removed.

    Example:
        >>> os.mkdir(os.path.join(doctest_tmp, ".step-4.torchaux-tmp-1-ab"))
        >>> [os.path.basename(p) for p in remove_stale_temp_dirs(doctest_tmp)]
        ['.step-4.torchaux-tmp-1-ab']
    """
    removed = []
    own = f"-{os.getpid()}-"
    for name in sorted(os.listdir(directory)):
        if TEMP_MARKER not in name:
            continue
        if other_pids_only and own in "-" + name.split(TEMP_MARKER, 1)[1]:
            continue
        full = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: the goal
            remove_tree(full)
            removed.append(full)
    return removed
