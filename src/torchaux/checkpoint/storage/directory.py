"""Whole-directory commit: publish a staged checkpoint folder under its final name, or remove one.

:mod:`.commit` makes one *file* appear atomically.  Framework checkpoints (the
Hugging Face Trainer's ``checkpoint-<N>``) are directories of several files
that a reader takes as a unit, so they are written into a staging folder
beside the target and published with one ``rename``:

1. the writers fill ``<parent>/<staging name>`` (a name the framework never
   takes for a checkpoint, e.g. ``tmp-checkpoint-<N>``);
2. :func:`publish_directory` fsyncs every file in it and the folder itself,
   renames it to the final name and fsyncs the parent, so after a crash the
   parent holds the complete new folder or none at all;
3. :func:`remove_tree` deletes a published folder (retention) or a stale staging
   folder left by a killed run, deepest entries first, then fsyncs the parent.

An existing folder of the final name (a step saved again) is swapped with the
staging folder in one ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; ext4, xfs,
btrfs, tmpfs), so the final name always holds the complete old folder or the
complete new one; the old folder, now under the staging name, is then
removed.  Where the exchange is not supported (another OS, NFS) the old
folder is first renamed aside to a hidden ``.<name>.torchaux-old-<token>``:
a crash between the two renames then leaves no folder under the final name,
only that aside copy, which :func:`remove_stale` deletes.  (The manager's
crash-state explorer, tests/manager/test_manager_crash_states.py, found that state:
a forced re-save could lose the newest step.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys

from torchaux import _knobs

__all__ = ["publish_directory", "remove_tree", "remove_stale", "OLD_MARKER"]

#: Substring of the hidden name a replaced folder gets until it is deleted.
OLD_MARKER = ".torchaux-old-"


def _fsync_path(path: str) -> None:
    # Directories cannot be opened for fsync on Windows; the file system
    # journal makes renames durable there.
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: ``renameat2`` flag and "current directory" fd (linux/fs.h, linux/fcntl.h).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the entries ``a`` and ``b``; False where the system cannot.

    >>> a, b = os.path.join(doctest_tmp, "a"), os.path.join(doctest_tmp, "b")
    >>> os.mkdir(a); open(b, "wb").close()
    >>> _exchange(a, b) in (True, False), os.path.isdir(a) != os.path.isdir(b)
    (True, True)
    """
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, musl
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not supported by this kernel or file system: fall back to two renames
    raise OSError(code, os.strerror(code), a)


def publish_directory(staging: str, final: str) -> str:
    """Make the complete folder ``staging`` appear as ``final`` in one rename.

    Args:
        staging: the filled staging folder; same parent directory as ``final``.
        final: the published name.

    Returns:
        ``final`` as an absolute path.

    Raises:
        ValueError: the two paths are not in the same directory (a rename
            across directories could cross file systems and not be atomic).
        FileNotFoundError: ``staging`` does not exist.

    Example:
        >>> src = os.path.join(doctest_tmp, "tmp-checkpoint-3")
        >>> os.makedirs(src)
        >>> open(os.path.join(src, "a.bin"), "wb").close()
        >>> out = publish_directory(src, os.path.join(doctest_tmp, "checkpoint-3"))
        >>> os.listdir(out), os.path.exists(src)
        (['a.bin'], False)
    """
    staging, final = os.path.abspath(staging), os.path.abspath(final)
    parent = os.path.dirname(final)
    if os.path.dirname(staging) != parent:
        raise ValueError(
            f"staging folder {staging!r} must be in the same directory as {final!r}; "
            "create it beside the target so the rename stays atomic"
        )
    if not os.path.isdir(staging):
        raise FileNotFoundError(f"staging folder {staging!r} does not exist; nothing to publish")
    if _knobs.fsync_enabled():
        for root, _dirs, files in os.walk(staging):
            for name in files:
                _fsync_path(os.path.join(root, name))
            _fsync_path(root)
    aside = None
    if os.path.lexists(final) and _exchange(staging, final):
        aside = staging  # now holds the old folder
    else:
        if os.path.lexists(final):
            aside = os.path.join(
                parent, f".{os.path.basename(final)}{OLD_MARKER}{secrets.token_hex(4)}")
            os.rename(final, aside)
        os.rename(staging, final)
    if _knobs.fsync_enabled():
        _fsync_path(parent)
    if aside is not None:
        remove_tree(aside)
    return final


def remove_tree(path: str) -> None:
    """Delete the file or folder ``path`` (missing is fine), then fsync its parent.

    Example:
        >>> d = os.path.join(doctest_tmp, "old")
        >>> os.makedirs(os.path.join(d, "sub"))
        >>> remove_tree(d); os.path.exists(d)
        False
    """
    path = os.path.abspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=_ignore_missing)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if _knobs.fsync_enabled():
        _fsync_path(os.path.dirname(path))


def remove_stale(parent: str, staging_names: list[str]) -> list[str]:
    """Remove staging folders ``staging_names`` and replaced folders left in ``parent``.

    Call when no writer of this run uses them (at the start of a run): a
    killed run leaves its half-written staging folder behind.

    Returns:
        The paths removed.

    Example:
        >>> os.makedirs(os.path.join(doctest_tmp, "p", "tmp-checkpoint-9"))
        >>> [os.path.basename(p) for p in remove_stale(os.path.join(doctest_tmp, "p"), ["tmp-checkpoint-9"])]
        ['tmp-checkpoint-9']
    """
    removed = []
    wanted = set(staging_names)
    for name in sorted(os.listdir(parent)):
        if name in wanted or OLD_MARKER in name:
            full = os.path.join(parent, name)
            remove_tree(full)
            removed.append(full)
    return removed


def _ignore_missing(func: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
    # Another process (or a retried cleanup) may remove the same entries.
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
