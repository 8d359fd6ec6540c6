"""Atomic, durable commit of one file: the only module that renames or deletes files.

The durability order is fixed and tested (tests/checkpoint/storage/test_commit.py):

1. create a temp file beside the target (same directory, so the rename cannot
   cross file systems), named ``.<name>.torchaux-tmp-<pid>-<token>``;
2. write all bytes into it (with ``O_DIRECT`` where possible, so a checkpoint
   does not pass through the page cache: :mod:`.direct_io`);
3. ``flush`` + ``fsync`` the temp file (data reaches the disk);
4. ``os.replace(temp, target)`` (atomic on POSIX and Windows: readers see the
   old file or the new one, never a mix);
5. ``fsync`` the directory (the rename itself survives a power failure).

Only after step 5 does a save count as committed.  If anything fails before
step 4 the temp file is removed and the previous file at the target is
untouched; a SIGKILL between 1 and 4 leaves only a stale temp file, which
:func:`remove_stale_temps` can delete.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
from collections.abc import Iterator
from typing import BinaryIO

from torchaux import _knobs
from torchaux.checkpoint.storage.direct_io import DirectFile, enable_direct_io

__all__ = ["atomic_write", "fsync_directory", "temp_path_for", "remove_stale_temps", "TEMP_MARKER"]

#: Substring that marks our temp files; never appears in a committed name.
TEMP_MARKER = ".torchaux-tmp-"


def temp_path_for(path: str) -> str:
    """Return a fresh temp path in the same directory as ``path``.

    >>> temp_path_for("/ckpt/model.pt").startswith("/ckpt/.model.pt.torchaux-tmp-")
    True
    """
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _open_writer(fd: int) -> Iterator[BinaryIO | DirectFile]:
    """A file object over ``fd`` (closed on exit): direct I/O if on and possible, else buffered."""
    try:
        if _knobs.direct_io_enabled() and enable_direct_io(fd):
            with DirectFile(fd, buffer_bytes=_knobs.direct_io_buffer_bytes()) as direct:
                yield direct
            return
        buffering = _knobs.write_buffer_bytes()
        with io.open(fd, "wb", buffering=buffering if buffering > 0 else 0, closefd=False) as f:
            yield f
    finally:
        os.close(fd)


def fsync_directory(directory: str) -> None:
    """Make the renames, creations and unlinks inside ``directory`` durable (no-op on Windows).

    >>> fsync_directory(doctest_tmp)
    """
    # Directories cannot be opened for fsync on Windows; the rename there is
    # made durable by the file system journal instead.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str, *, fsync: bool | None = None, mode: int | None = None
) -> Iterator[BinaryIO]:
    """Open a temp file for writing and commit it to ``path`` on clean exit.

    Args:
        path: final file path; its directory must exist.
        fsync: override the ``TORCHAUX_FSYNC`` knob (default: on).
        mode: permission bits of the new file (e.g. ``0o600``), set before any
            byte is written; default: those of the file being replaced, else
            ``0o666`` minus the umask, as ``open()`` would.

    Yields:
        A binary file object to write the complete content into.

    Raises:
        Whatever writing raised; the temp file is removed first and the
        previous file at ``path`` (if any) is left untouched.

    Example:
        >>> import os
        >>> target = os.path.join(doctest_tmp, "hello.bin")
        >>> with atomic_write(target) as f:
        ...     _ = f.write(b"hello")
        >>> open(target, "rb").read()
        b'hello'
    """
    do_fsync = _knobs.fsync_enabled() if fsync is None else fsync
    target = os.path.abspath(path)
    tmp = temp_path_for(target)
    # O_EXCL already refuses an existing name, a symlink included; O_NOFOLLOW
    # says so explicitly (security review, issue #16 item 1).
    flags = (
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_NOFOLLOW", 0)
    )
    fd = os.open(tmp, flags, 0o600 if mode is not None else 0o666)
    try:
        with _open_writer(fd) as f:  # owns fd from here on
            if mode is not None:
                os.chmod(fd, mode)
            else:
                with contextlib.suppress(FileNotFoundError):
                    # Overwriting in place (torch.save) keeps the file's permissions;
                    # a replaced file must keep them too (e.g. a 0o600 checkpoint).
                    # lstat: a symlink at the target is replaced by os.replace, never
                    # written through, so its destination's bits are not ours to copy.
                    st = os.lstat(target)
                    if not stat.S_ISLNK(st.st_mode):
                        os.chmod(fd, stat.S_IMODE(st.st_mode))
            yield f  # type: ignore[misc]
            f.flush()
            if isinstance(f, DirectFile):
                f.finish()
            if do_fsync:
                os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if do_fsync:
        fsync_directory(os.path.dirname(target))


def _temp_pid(name: str) -> int | None:
    """The writer pid in a temp name (``.<name>.torchaux-tmp-<pid>-<token>``), None if malformed."""
    pid = name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _pid_alive(pid: int) -> bool:
    # Signal 0 checks existence without sending anything (kill(2)).  Windows has
    # no such probe (os.kill would terminate the process): assume alive there.
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def remove_stale_temps(
    directory: str | os.PathLike[str], *, other_pids_only: bool = True, pid: int | None = None
) -> list[str]:
    """Delete temp files (not folders) that crashed saves left in ``directory``.

    A temp file names the process writing it.  By default only temps of
    processes that no longer exist on this host are removed: this process's
    own, a live writer process's (a ``ProcessSaver`` child writes under its own
    pid) and any other running process's in-flight temps are kept.  Pids are
    only meaningful on one host: on a file system shared between hosts, run it
    where no other host is saving into ``directory``.

    Args:
        directory: the checkpoint directory to clean.
        other_pids_only: keep temps of live processes, this one included
            (False: remove every temp file, in-flight ones too).
        pid: remove only the temps written by this (dead) process.

    Returns:
        The paths removed.

    Raises:
        TypeError: ``directory`` is not a path or ``pid`` not an int.
        NotADirectoryError, FileNotFoundError: ``directory`` is not a directory.

    Example:
        >>> dead = 4194305  # above Linux's largest pid_max (2**22): never a live process
        >>> open(os.path.join(doctest_tmp, f".a.pt.torchaux-tmp-{dead}-ab"), "wb").close()
        >>> [os.path.basename(p) for p in remove_stale_temps(doctest_tmp)]
        ['.a.pt.torchaux-tmp-4194305-ab']
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
        raise TypeError(f"pid must be an int or None, got {type(pid).__name__}")
    directory = os.fspath(directory)
    removed = []
    for name in os.listdir(directory):
        if TEMP_MARKER not in name:
            continue
        writer = _temp_pid(name)
        if pid is not None:
            if writer != pid:
                continue
        elif other_pids_only and writer is not None and (writer == os.getpid() or _pid_alive(writer)):
            continue
        full = os.path.join(directory, name)
        if os.path.isdir(full) and not os.path.islink(full):
            continue  # a folder (staging, manager temp step): not a temp file; its owner cleans it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)
            removed.append(full)
    return removed
