"""Record a save's file-system calls and build every state a power loss could leave.

The method is ALICE's (Pillai et al., "All File Systems Are Not Created Equal",
OSDI'14) and CrashMonkey's (Mohan et al., OSDI'18): record the operations an
application performs at the layer that performs them, then construct each
on-disk state the file system's persistence rules allow after a crash at any
point, and check the application's invariant in every one.

Recording patches the ``os`` functions torchaux's I/O layer calls
(``open``, ``write``, ``ftruncate``, ``fsync``, ``fdatasync``, ``replace``,
``rename``, ``unlink``/``remove``, ``mkdir``, ``rmdir``) for descriptors and
paths under one root directory, makes ``shutil.rmtree`` use its path-based
walk (so each unlink and rmdir goes through those functions), and replaces the
buffered writer of :mod:`torchaux.checkpoint.storage.commit` with one whose
raw layer calls ``os.write`` (CPython's ``FileIO`` writes without going
through the ``os`` module, so it would escape the recording).
:meth:`Recorder.verify` checks afterwards that replaying the recording
rebuilds the real tree byte for byte, so an operation that escaped the
recording fails the test instead of shrinking the explored space.

Operations name inodes (small integers), not paths, so renamed directories
keep their contents: ``("create", parent, name, fid)``, ``("mkdir", parent,
name, did)``, ``("write", fid, offset, bytes)``, ``("truncate", fid, length)``,
``("fsync", fid)``, ``("fsync_dir", did)``, ``("rename", src_parent, src_name,
dst_parent, dst_name)``, ``("exchange", parent_a, name_a, parent_b, name_b)``
(``renameat2(RENAME_EXCHANGE)``, which :mod:`torchaux.checkpoint.storage.directory`
calls through ctypes: recorded by patching its ``_exchange``),
``("unlink", parent, name)``, ``("rmdir", parent, name)``.

Persistence model (POSIX guarantees; ALICE §3, "abstract persistence model"):

* a file's writes since its last ``fsync``/``fdatasync`` may each be lost,
  applied whole, or applied in part at block granularity (a prefix of its
  4 KiB blocks, or all but its last block), in any combination (so also
  reordered);
* directory operations (create, mkdir, rename, unlink, rmdir) not yet made
  durable persist as any *downward-closed* subset: in ``"ordered"`` mode (ext4
  ``data=ordered``: metadata is journaled in order) an operation persists only
  with every earlier pending operation on a directory it shares; in ``"any"``
  mode (POSIX's minimum) only operations on the same directory *entry* keep
  their order, so e.g. two renames in one directory may persist either one;
* ``fsync`` of a directory makes every pending operation on it durable (and
  what those depend on); ``fsync`` of a file makes its data durable, not its
  directory entry.

Example:
    >>> model = CrashModel.flat({"ckpt.pt": b"old"})
    >>> model.apply(("create", 0, "tmp", 5))
    >>> model.apply(("write", 5, 0, b"new!"))
    >>> model.apply(("rename", 0, "tmp", 0, "ckpt.pt"))
    >>> sorted({s.get("ckpt.pt") for s in model.states()})  # no fsync: torn states exist
    [b'', b'new!', b'old']
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from torchaux.checkpoint.storage import commit as _commit
from torchaux.checkpoint.storage import directory as _directory

#: Block size of partial writes (ext4's default block size, and the page size).
BLOCK = 4096

#: Inode number of the recorded root directory.
ROOT = 0

Op = tuple[Any, ...]

_DIR_OPS = ("create", "mkdir", "rename", "exchange", "unlink", "rmdir")


@dataclass
class Tree:
    """A directory tree by inode: ``dirs[did] = {name: inode}``, ``data[fid] = bytes``."""

    dirs: dict[int, dict[str, int]] = field(default_factory=lambda: {ROOT: {}})
    data: dict[int, bytes] = field(default_factory=dict)

    def copy(self) -> Tree:
        return Tree({d: dict(e) for d, e in self.dirs.items()}, dict(self.data))


class State(dict):
    """One crash state: relative path -> bytes of every reachable file; ``dirs``: its folders."""

    def __init__(self, files: dict[str, bytes], dirs: frozenset[str]) -> None:
        super().__init__(files)
        self.dirs = dirs

    def key(self) -> tuple:
        """A hashable identity (to explore each distinct state once)."""
        return (tuple(sorted(self.items())), tuple(sorted(self.dirs)))

    def materialize(self, root: str) -> None:
        """Write this state into the empty directory ``root``."""
        for d in sorted(self.dirs):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        for name, content in self.items():
            with open(os.path.join(root, name), "wb") as f:
                f.write(content)


class Recorder:
    """Records file-system operations on paths under ``root``; optionally injects faults.

    ``fail`` maps an operation kind (``"write"``, ``"fsync"``, ``"fsync_dir"``,
    ``"rename"``, ``"create"``) to ``(k, errno)``: the k-th such operation (from
    1) raises ``OSError(errno)`` instead of running, and is not recorded.
    :attr:`initial` is the tree as it was when the recorder was made.
    """

    def __init__(self, root: str, fail: dict[str, tuple[int, int]] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.ops: list[Op] = []
        self.counts: dict[str, int] = {}
        self.fail = dict(fail or {})
        self.injected: list[tuple[str, int]] = []
        self._lock = threading.RLock()
        self._files: dict[int, int] = {}  # fd -> file id
        self._dirs: dict[int, int] = {}  # fd -> directory id
        self._pos: dict[int, int] = {}
        self._ino: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> id
        self._next_id = ROOT + 1
        self.initial = self._snapshot()

    # -- identities -------------------------------------------------------------

    def _new_id(self, st: os.stat_result) -> int:
        ident = self._next_id
        self._next_id += 1
        self._ino[(st.st_dev, st.st_ino)] = ident
        return ident

    def _snapshot(self) -> Tree:
        tree = Tree()
        self._ino[_key(os.stat(self.root))] = ROOT
        for parent, dirnames, filenames in os.walk(self.root):
            pid = self._ino[_key(os.stat(parent))]
            for name in dirnames + filenames:
                full = os.path.join(parent, name)
                ident = self._new_id(os.lstat(full))
                tree.dirs[pid][name] = ident
                if name in dirnames:
                    tree.dirs[ident] = {}
                else:
                    with open(full, "rb") as f:
                        tree.data[ident] = f.read()
        return tree

    def _id_of(self, path: str) -> int:
        return self._ino[_key(os.lstat(path))]

    def _inside(self, path: Any) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        full = os.path.abspath(os.fspath(path))
        return full == self.root or full.startswith(self.root + os.sep)

    def _parent(self, path: Any) -> tuple[int, str]:
        full = os.path.abspath(os.fspath(path))
        return self._id_of(os.path.dirname(full)), os.path.basename(full)

    def _maybe_fail(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        spec = self.fail.get(kind)
        if spec is not None and spec[0] == self.counts[kind]:
            self.injected.append((kind, spec[1]))
            raise OSError(spec[1], f"{os.strerror(spec[1])} (injected at {kind} #{spec[0]})")

    # -- recording --------------------------------------------------------------

    @contextlib.contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
        """Patch the ``os`` functions (and commit's buffered writer) while the block runs."""
        real = {n: getattr(os, n) for n in (
            "open", "write", "ftruncate", "fsync", "fdatasync", "replace", "rename", "unlink",
            "remove", "mkdir", "rmdir", "close", "lseek")}
        rec = self

        def _open(path: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
            inside = rec._inside(path) and not k.get("dir_fd")
            with rec._lock:
                creating = inside and bool(flags & os.O_CREAT) and not os.path.lexists(path)
                if creating:
                    rec._maybe_fail("create")
                fd = real["open"](path, flags, mode, *a, **k)
                if not inside:
                    return fd
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    rec._dirs[fd] = rec._ino[_key(st)]
                    return fd
                if creating:
                    fid = rec._new_id(st)
                    rec.ops.append(("create", *rec._parent(path), fid))
                else:
                    fid = rec._ino[_key(st)]
                rec._files[fd], rec._pos[fd] = fid, 0
                if flags & os.O_TRUNC:
                    rec.ops.append(("truncate", fid, 0))
            return fd

        def _write(fd: int, data: Any) -> int:
            if fd not in rec._files:
                return real["write"](fd, data)
            with rec._lock:
                rec._maybe_fail("write")
                n = real["write"](fd, data)
                rec.ops.append(("write", rec._files[fd], rec._pos[fd], bytes(memoryview(data)[:n])))
                rec._pos[fd] += n
            return n

        def _lseek(fd: int, pos: int, how: int) -> int:
            out = real["lseek"](fd, pos, how)
            if fd in rec._pos:
                rec._pos[fd] = out
            return out

        def _ftruncate(fd: int, length: int) -> None:
            with rec._lock:
                real["ftruncate"](fd, length)
                if fd in rec._files:
                    rec.ops.append(("truncate", rec._files[fd], length))

        def _sync(name: str) -> Any:
            def sync(fd: int) -> None:
                with rec._lock:
                    if fd in rec._dirs or fd in rec._files:
                        rec._maybe_fail("fsync_dir" if fd in rec._dirs else "fsync")
                    real[name](fd)
                    if fd in rec._files:
                        rec.ops.append(("fsync", rec._files[fd]))
                    elif fd in rec._dirs:
                        rec.ops.append(("fsync_dir", rec._dirs[fd]))
            return sync

        def _rename(name: str) -> Any:
            def rename(src: Any, dst: Any, *a: Any, **k: Any) -> None:
                if not rec._inside(dst) or a or k:
                    return real[name](src, dst, *a, **k)
                with rec._lock:
                    rec._maybe_fail("rename")
                    source, target = rec._parent(src), rec._parent(dst)
                    real[name](src, dst)
                    rec.ops.append(("rename", *source, *target))
            return rename

        def _remove(name: str, kind: str) -> Any:
            def remove(path: Any, *a: Any, **k: Any) -> None:
                if not rec._inside(path) or a or k:
                    return real[name](path, *a, **k)
                with rec._lock:
                    where = rec._parent(path)
                    real[name](path)
                    rec.ops.append((kind, *where))
            return remove

        def _mkdir(path: Any, mode: int = 0o777, *a: Any, **k: Any) -> None:
            if not rec._inside(path) or a or k:
                return real["mkdir"](path, mode, *a, **k)
            with rec._lock:
                real["mkdir"](path, mode)
                did = rec._new_id(os.lstat(path))
                rec.ops.append(("mkdir", *rec._parent(path), did))

        real_exchange = _directory._exchange

        def _exchange(a: str, b: str) -> bool:
            if not rec._inside(b):
                return real_exchange(a, b)
            with rec._lock:
                rec._maybe_fail("rename")
                first, second = rec._parent(a), rec._parent(b)
                done = real_exchange(a, b)
                if done:
                    rec.ops.append(("exchange", *first, *second))
            return done

        def _close(fd: int) -> None:
            # Forget the descriptor and close it under the lock: closed first, its
            # number could be reused by another thread's open before the pop, which
            # would then drop that file's mapping and its writes would go unrecorded
            # (a 4-rank save on a loaded machine: "an operation escaped the recording").
            with rec._lock:
                rec._files.pop(fd, None)
                rec._pos.pop(fd, None)
                rec._dirs.pop(fd, None)
                real["close"](fd)

        for name, fn in {"open": _open, "write": _write, "lseek": _lseek,
                         "ftruncate": _ftruncate, "fsync": _sync("fsync"),
                         "fdatasync": _sync("fdatasync"), "replace": _rename("replace"),
                         "rename": _rename("rename"), "unlink": _remove("unlink", "unlink"),
                         "remove": _remove("remove", "unlink"), "rmdir": _remove("rmdir", "rmdir"),
                         "mkdir": _mkdir, "close": _close}.items():
            monkeypatch.setattr(os, name, fn)
        monkeypatch.setattr(_commit, "io", _RecordedIO)
        monkeypatch.setattr(_directory, "_exchange", _exchange)
        # rmtree's fd-based walk unlinks with dir_fd=, which the recording does not follow.
        fd_functions = shutil._use_fd_functions  # type: ignore[attr-defined]
        monkeypatch.setattr(shutil, "_use_fd_functions", False)
        try:
            yield self
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(os, name, fn)
            monkeypatch.setattr(_commit, "io", io)
            monkeypatch.setattr(_directory, "_exchange", real_exchange)
            monkeypatch.setattr(shutil, "_use_fd_functions", fd_functions)

    def verify(self) -> None:
        """Replaying every recorded op must rebuild the real tree (nothing escaped the recording)."""
        tree = self.initial.copy()
        for op in self.ops:
            if op[0] in _DIR_OPS:
                _apply_tree(tree, op)
            elif op[0] in ("write", "truncate"):
                _apply_data(tree, op)
        real = Recorder(self.root).initial
        assert _flatten(tree) == _flatten(real), "an operation escaped the recording"


def _key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


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


# -- the model ------------------------------------------------------------------


def _touches(op: Op) -> set[int]:
    return {op[1], op[3]} if op[0] in ("rename", "exchange") else {op[1]}


def _entries(op: Op) -> set[tuple[int, str]]:
    if op[0] in ("rename", "exchange"):
        return {(op[1], op[2]), (op[3], op[4])}
    return {(op[1], op[2])}


def _apply_tree(tree: Tree, op: Op) -> None:
    kind = op[0]
    if kind in ("create", "mkdir"):
        tree.dirs.setdefault(op[1], {})[op[2]] = op[3]
        if kind == "mkdir":
            tree.dirs.setdefault(op[3], {})
        else:
            tree.data.setdefault(op[3], b"")
    elif kind == "rename":
        source = tree.dirs.setdefault(op[1], {})
        if op[2] in source:  # its creation may not have persisted
            tree.dirs.setdefault(op[3], {})[op[4]] = source.pop(op[2])
    elif kind == "exchange":  # one atomic swap of two entries
        first, second = tree.dirs.setdefault(op[1], {}), tree.dirs.setdefault(op[3], {})
        a, b = first.pop(op[2], None), second.pop(op[4], None)
        if b is not None:
            first[op[2]] = b
        if a is not None:
            second[op[4]] = a
    else:  # unlink, rmdir: an rmdir'd folder's pending contents become unreachable
        tree.dirs.setdefault(op[1], {}).pop(op[2], None)


def _apply_data(tree: Tree, op: Op) -> None:
    buf = bytearray(tree.data.get(op[1], b""))
    _apply_one(buf, op, len(op[3]) if op[0] == "write" else 0)
    tree.data[op[1]] = bytes(buf)


def _flatten(tree: Tree) -> State:
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    stack = [(ROOT, "")]
    while stack:
        did, prefix = stack.pop()
        for name, ident in tree.dirs.get(did, {}).items():
            rel = prefix + name
            if ident in tree.dirs:
                dirs.add(rel)
                stack.append((ident, rel + "/"))
            else:
                files[rel] = tree.data.get(ident, b"")
    return State(files, frozenset(dirs))


class CrashModel:
    """Replays recorded operations and enumerates the states a power loss may leave.

    Args:
        before: the durable tree before the recording (:attr:`Recorder.initial`).
        order: ``"ordered"`` (directory operations on a shared folder persist
            in order) or ``"any"`` (only operations on the same entry do).
    """

    def __init__(self, before: Tree, order: str = "ordered") -> None:
        if order not in ("ordered", "any"):
            raise ValueError(f"order must be 'ordered' or 'any'; got {order!r}")
        self.order = order
        self.durable = before.copy()
        self.pending_writes: dict[int, list[Op]] = {}
        self.pending_dir: list[Op] = []

    @classmethod
    def flat(cls, files: dict[str, bytes], order: str = "ordered") -> CrashModel:
        """A model of one folder (inode 0) holding ``files`` (inodes 1, 2, ...)."""
        tree = Tree()
        for i, (name, content) in enumerate(sorted(files.items()), start=1):
            tree.dirs[ROOT][name], tree.data[i] = i, content
        return cls(tree, order)

    def _depends(self, later: Op, earlier: Op) -> bool:
        if self.order == "ordered":
            return bool(_touches(later) & _touches(earlier))
        return bool(_entries(later) & _entries(earlier))

    def _closure(self, chosen: set[int]) -> set[int]:
        out = set(chosen)
        changed = True
        while changed:
            changed = False
            for j in sorted(out, reverse=True):
                for i in range(j):
                    if i not in out and self._depends(self.pending_dir[j], self.pending_dir[i]):
                        out.add(i)
                        changed = True
        return out

    def apply(self, op: Op) -> None:
        """Add one recorded operation to the model."""
        kind = op[0]
        if kind in _DIR_OPS:
            if kind == "create":
                self.durable.data.setdefault(op[3], b"")
            self.pending_dir.append(op)
        elif kind in ("write", "truncate"):
            self.pending_writes.setdefault(op[1], []).append(op)
        elif kind == "fsync":
            self.durable.data[op[1]] = _apply_all(
                self.durable.data.get(op[1], b""), self.pending_writes.pop(op[1], []))
        elif kind == "fsync_dir":
            done = self._closure({j for j, p in enumerate(self.pending_dir) if op[1] in _touches(p)})
            for j in sorted(done):
                _apply_tree(self.durable, self.pending_dir[j])
            self.pending_dir = [p for j, p in enumerate(self.pending_dir) if j not in done]
        else:  # pragma: no cover - the recorder produces no other kind
            raise AssertionError(op)

    def _persisted_sets(self) -> Iterator[list[int]]:
        """Every downward-closed subset of the pending directory operations, in order."""
        ops = self.pending_dir
        deps = [[i for i in range(j) if self._depends(ops[j], ops[i])] for j in range(len(ops))]

        def walk(j: int, chosen: list[int], taken: set[int]) -> Iterator[list[int]]:
            if j == len(ops):
                yield list(chosen)
                return
            yield from walk(j + 1, chosen, taken)
            if all(i in taken for i in deps[j]):
                chosen.append(j)
                taken.add(j)
                yield from walk(j + 1, chosen, taken)
                chosen.pop()
                taken.discard(j)

        yield from walk(0, [], set())

    def states(self) -> Iterator[State]:
        """Every tree a crash now could leave, flattened (relative path -> bytes)."""
        for chosen in self._persisted_sets():
            tree = self.durable.copy()
            for j in chosen:
                _apply_tree(tree, self.pending_dir[j])
            base = _flatten(tree)
            paths = _paths_of(tree)
            fids = sorted(f for f in self.pending_writes if f in paths)
            per_file = [list(_write_choices(tree.data.get(f, b""), self.pending_writes[f]))
                        for f in fids]
            for combo in itertools.product(*per_file):
                files = dict(base)
                for fid, content in zip(fids, combo):
                    for path in paths[fid]:
                        files[path] = content
                yield State(files, base.dirs)


def _paths_of(tree: Tree) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    stack = [(ROOT, "")]
    while stack:
        did, prefix = stack.pop()
        for name, ident in tree.dirs.get(did, {}).items():
            if ident in tree.dirs:
                stack.append((ident, prefix + name + "/"))
            else:
                out.setdefault(ident, []).append(prefix + name)
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
    seen = set()
    for keep in itertools.product(*options):
        buf = bytearray(content)
        for op, k in zip(writes, keep):
            if op[0] == "truncate":
                if k:
                    _apply_one(buf, op, 0)
            elif k:
                _apply_one(buf, op, k)
        out = bytes(buf)
        if out not in seen:
            seen.add(out)
            yield out


def explore(before: Tree | dict[str, bytes], ops: list[Op], *,
            order: str = "ordered") -> Iterator[tuple[int, State]]:
    """Yield ``(crash point, state)`` for a crash before each op and after the last.

    Example:
        >>> ops = [("create", 0, "t", 1), ("write", 1, 0, b"x"), ("fsync", 1),
        ...        ("rename", 0, "t", 0, "f"), ("fsync_dir", 0)]
        >>> sorted({s.get("f", b"-") for _, s in explore({}, ops)})  # never a torn "f"
        [b'-', b'x']
    """
    model = CrashModel(before, order) if isinstance(before, Tree) else CrashModel.flat(before, order)
    for point in range(len(ops) + 1):
        for state in model.states():
            yield point, state
        if point < len(ops):
            model.apply(ops[point])


def distinct(before: Tree, ops: list[Op], *, order: str = "ordered") -> tuple[int, dict]:
    """``(states explored, {state key: (state, [crash points])})``: each distinct state once."""
    n, out = 0, {}
    for point, state in explore(before, ops, order=order):
        n += 1
        k = state.key()
        if k in out:
            out[k][1].append(point)
        else:
            out[k] = (state, [point])
    return n, out


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
