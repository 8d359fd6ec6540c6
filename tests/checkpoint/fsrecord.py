"""Record a save's file-system calls and build every state a power loss could leave.

The method is ALICE's (Pillai et al., "All File Systems Are Not Created Equal",
OSDI'14) and CrashMonkey's (Mohan et al., OSDI'18): record the operations an
application performs at the layer that performs them, then construct each
on-disk state the file system's persistence rules allow after a crash at any
point, and check the application's invariant in every one.

Recording patches the ``os`` functions torchaux's I/O layer calls
(``open``, ``write``, ``ftruncate``, ``fsync``, ``fdatasync``, ``replace``,
``rename``, ``unlink``) for descriptors and paths under one root directory,
and replaces the buffered writer of :mod:`torchaux.checkpoint.storage.commit`
with one whose raw layer calls ``os.write`` (CPython's ``FileIO`` writes
without going through the ``os`` module, so it would escape the recording).

Persistence model (POSIX guarantees, with ext4 ``data=ordered`` ordering of
metadata; ALICE §3, "abstract persistence model"):

* a file's writes since its last ``fsync``/``fdatasync`` may each be lost,
  applied whole, or applied in part at block granularity (a prefix of its
  4 KiB blocks, or all but its last block), in any combination;
* directory operations (create, rename, unlink) since the directory's last
  ``fsync`` persist as an in-order prefix (metadata journaling keeps their
  order but a crash may cut it anywhere);
* ``fsync`` of a file makes its data durable, not its directory entry.

Example:
    >>> model = CrashModel({"ckpt.pt": b"old"})
    >>> model.apply(("create", "tmp", 1))
    >>> model.apply(("write", 1, 0, b"new!"))
    >>> model.apply(("rename", "tmp", "ckpt.pt"))
    >>> sorted({s.get("ckpt.pt") for s in model.states()})  # no fsync: torn states exist
    [b'', b'new!', b'old']
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from torchaux.checkpoint.storage import commit as _commit

#: Block size of partial writes (ext4's default block size, and the page size).
BLOCK = 4096

Op = tuple[Any, ...]


class Recorder:
    """Records file-system operations on paths under ``root``; optionally injects faults.

    ``fail`` maps an operation kind (``"write"``, ``"fsync"``, ``"fsync_dir"``,
    ``"rename"``, ``"create"``) to ``(k, errno)``: the k-th such operation (from
    1) raises ``OSError(errno)`` instead of running, and is not recorded.
    """

    def __init__(self, root: str, fail: dict[str, tuple[int, int]] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.ops: list[Op] = []
        self.counts: dict[str, int] = {}
        self.fail = dict(fail or {})
        self.injected: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._files: dict[int, int] = {}  # fd -> file id
        self._dirs: set[int] = set()
        self._pos: dict[int, int] = {}
        self._next_id = 1000  # ids below are reserved for files that existed before

    def _inside(self, path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(
            self.root + os.sep
        ) or (isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)) == self.root)

    def _name(self, path: Any) -> str:
        return os.path.relpath(os.path.abspath(os.fspath(path)), self.root)

    def _maybe_fail(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        spec = self.fail.get(kind)
        if spec is not None and spec[0] == self.counts[kind]:
            self.injected.append((kind, spec[1]))
            raise OSError(spec[1], f"{os.strerror(spec[1])} (injected at {kind} #{spec[0]})")

    @contextlib.contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
        """Patch the ``os`` functions (and commit's buffered writer) while the block runs."""
        real = {n: getattr(os, n) for n in (
            "open", "write", "ftruncate", "fsync", "fdatasync", "replace", "rename", "unlink",
            "close", "lseek")}
        rec = self

        def _open(path: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
            inside = rec._inside(path)
            creating = inside and bool(flags & os.O_CREAT) and not os.path.exists(path)
            if creating:
                with rec._lock:
                    rec._maybe_fail("create")
            fd = real["open"](path, flags, mode, *a, **k)
            if inside:
                with rec._lock:
                    if os.path.isdir(path):
                        rec._dirs.add(fd)
                    else:
                        fid = rec._next_id if creating else rec._existing_id(path)
                        rec._next_id += creating
                        rec._files[fd], rec._pos[fd] = fid, 0
                        if creating:
                            rec.ops.append(("create", rec._name(path), fid))
                        if flags & os.O_TRUNC:
                            rec.ops.append(("truncate", fid, 0))
            return fd

        def _write(fd: int, data: Any) -> int:
            if fd not in rec._files:
                return real["write"](fd, data)
            with rec._lock:
                rec._maybe_fail("write")
            n = real["write"](fd, data)
            with rec._lock:
                rec.ops.append(("write", rec._files[fd], rec._pos[fd], bytes(memoryview(data)[:n])))
                rec._pos[fd] += n
            return n

        def _lseek(fd: int, pos: int, how: int) -> int:
            out = real["lseek"](fd, pos, how)
            if fd in rec._pos:
                rec._pos[fd] = out
            return out

        def _ftruncate(fd: int, length: int) -> None:
            real["ftruncate"](fd, length)
            if fd in rec._files:
                with rec._lock:
                    rec.ops.append(("truncate", rec._files[fd], length))

        def _sync(name: str) -> Any:
            def sync(fd: int) -> None:
                kind = "fsync_dir" if fd in rec._dirs else "fsync"
                if fd in rec._dirs or fd in rec._files:
                    with rec._lock:
                        rec._maybe_fail(kind)
                real[name](fd)
                with rec._lock:
                    if fd in rec._files:
                        rec.ops.append(("fsync", rec._files[fd]))
                    elif fd in rec._dirs:
                        rec.ops.append(("fsync_dir",))
            return sync

        def _rename(name: str) -> Any:
            def rename(src: Any, dst: Any, *a: Any, **k: Any) -> None:
                if rec._inside(dst):
                    with rec._lock:
                        rec._maybe_fail("rename")
                real[name](src, dst, *a, **k)
                if rec._inside(dst):
                    with rec._lock:
                        rec.ops.append(("rename", rec._name(src), rec._name(dst)))
            return rename

        def _unlink(path: Any, *a: Any, **k: Any) -> None:
            real["unlink"](path, *a, **k)
            if rec._inside(path):
                with rec._lock:
                    rec.ops.append(("unlink", rec._name(path)))

        def _close(fd: int) -> None:
            real["close"](fd)
            with rec._lock:
                rec._files.pop(fd, None)
                rec._pos.pop(fd, None)
                rec._dirs.discard(fd)

        for name, fn in {"open": _open, "write": _write, "lseek": _lseek,
                         "ftruncate": _ftruncate, "fsync": _sync("fsync"),
                         "fdatasync": _sync("fdatasync"), "replace": _rename("replace"),
                         "rename": _rename("rename"), "unlink": _unlink, "close": _close}.items():
            monkeypatch.setattr(os, name, fn)
        monkeypatch.setattr(_commit, "io", _RecordedIO)
        try:
            yield self
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(os, name, fn)
            monkeypatch.setattr(_commit, "io", io)

    def _existing_id(self, path: Any) -> int:
        # Files that existed before recording are named by their path's initial name.
        return hash(self._name(path)) % 997


class _RawFd(io.RawIOBase):
    """A raw file over a descriptor that writes through ``os.write`` (so it is recorded)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return os.write(self._fd, b)

    def fileno(self) -> int:
        return self._fd


class _RecordedIO:
    """Stands in for the ``io`` module inside commit.py: ``open(fd, "wb", ...)`` only."""

    @staticmethod
    def open(fd: int, mode: str, buffering: int = -1, closefd: bool = True) -> io.BufferedWriter:
        assert mode == "wb" and not closefd, (mode, closefd)
        return io.BufferedWriter(_RawFd(fd), buffer_size=max(buffering, 1) if buffering else 1)


class CrashModel:
    """Replays recorded operations and enumerates the states a power loss may leave.

    Args:
        before: the durable directory before the recording, name -> content.
    """

    def __init__(self, before: dict[str, bytes]) -> None:
        self._ids = {name: hash(name) % 997 for name in before}
        # durable view
        self.entries: dict[str, int] = dict(self._ids)
        self.data: dict[int, bytes] = {self._ids[n]: c for n, c in before.items()}
        # pending (not yet durable) changes
        self.pending_writes: dict[int, list[Op]] = {}
        self.pending_dir: list[Op] = []

    def apply(self, op: Op) -> None:
        """Add one recorded operation to the model."""
        kind = op[0]
        if kind == "create":
            self.data.setdefault(op[2], b"")
            self.pending_dir.append(op)
        elif kind in ("write", "truncate"):
            self.pending_writes.setdefault(op[1], []).append(op)
        elif kind == "fsync":
            self.data[op[1]] = _apply_all(self.data.get(op[1], b""), self.pending_writes.pop(op[1], []))
        elif kind == "fsync_dir":
            self.entries = _apply_dir(self.entries, self.pending_dir)
            self.pending_dir = []
        elif kind in ("rename", "unlink"):
            self.pending_dir.append(op)
        else:  # pragma: no cover - the recorder produces no other kind
            raise AssertionError(op)

    def states(self) -> Iterator[dict[str, bytes]]:
        """Every directory a crash now could leave: name -> content of each file."""
        per_file = {fid: list(_write_choices(self.data.get(fid, b""), ws))
                    for fid, ws in self.pending_writes.items()}
        fids = sorted(per_file)
        for cut in range(len(self.pending_dir) + 1):
            entries = _apply_dir(self.entries, self.pending_dir[:cut])
            for combo in itertools.product(*(per_file[f] for f in fids)):
                contents = dict(self.data) | dict(zip(fids, combo))
                yield {name: contents.get(fid, b"") for name, fid in entries.items()}


def _apply_dir(entries: dict[str, int], ops: list[Op]) -> dict[str, int]:
    out = dict(entries)
    for op in ops:
        if op[0] == "create":
            out[op[1]] = op[2]
        elif op[0] == "rename":
            if op[1] in out:
                out[op[2]] = out.pop(op[1])
        elif op[0] == "unlink":
            out.pop(op[1], None)
    return out


def _apply_all(content: bytes, writes: list[Op]) -> bytes:
    buf = bytearray(content)
    for op in writes:
        _apply_one(buf, op, len(op[3]) if op[0] == "write" else 0)
    return bytes(buf)


def _apply_one(buf: bytearray, op: Op, keep: int) -> None:
    if op[0] == "truncate":
        del buf[op[2]:]
        return
    offset, data = op[2], op[3][:keep]
    if len(buf) < offset:
        buf.extend(b"\0" * (offset - len(buf)))
    buf[offset:offset + len(data)] = data


def _write_choices(content: bytes, writes: list[Op]) -> Iterator[bytes]:
    """Each pending write lost, whole, or cut at a block boundary; in every combination."""
    options = []
    for op in writes:
        if op[0] == "truncate":
            options.append([0, 1])  # lost or applied
            continue
        n = len(op[3])
        cuts = {0, n}
        if n > BLOCK:
            cuts |= {BLOCK, n - (n % BLOCK or BLOCK)}
        options.append(sorted(cuts))
    for keep in itertools.product(*options):
        buf = bytearray(content)
        for op, k in zip(writes, keep):
            if op[0] == "truncate":
                if k:
                    _apply_one(buf, op, 0)
            elif k:
                _apply_one(buf, op, k)
        yield bytes(buf)


def explore(before: dict[str, bytes], ops: list[Op]) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Yield ``(crash point, state)`` for a crash before each op and after the last.

    Example:
        >>> ops = [("create", "t", 1), ("write", 1, 0, b"x"), ("fsync", 1),
        ...        ("rename", "t", "f"), ("fsync_dir",)]
        >>> sorted({s.get("f", b"-") for _, s in explore({}, ops)})  # never a torn "f"
        [b'-', b'x']
    """
    model = CrashModel(before)
    for point in range(len(ops) + 1):
        for state in model.states():
            yield point, state
        if point < len(ops):
            model.apply(ops[point])


def errno_of(exc: BaseException | None) -> int | None:
    """The errno of the first OSError in ``exc``'s cause/context chain (a wrapped fault's code).

    >>> try:
    ...     try:
    ...         raise OSError(28, "full")
    ...     except OSError as e:
    ...         raise RuntimeError("save failed") from e
    ... except RuntimeError as outer:
    ...     errno_of(outer)
    28
    """
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None
