"""DirectFile and atomic_write's O_DIRECT path: exact bytes, fallbacks, failures that reach the caller."""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Callable, Iterator

import pytest

from torchaux import _knobs
from torchaux.checkpoint.storage import commit as atomic
from torchaux.checkpoint.storage import direct_io
from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.storage.direct_io import ALIGNMENT, DirectFile, enable_direct_io

BUFFER = 2 * ALIGNMENT  # small buffers, so a few KiB exercise the write-behind thread


def _payload(n: int) -> bytes:
    return bytes((i * 131 + 7) % 251 for i in range(n))


@pytest.fixture
def fd_path(tmp_path: pathlib.Path) -> Iterator[tuple[int, pathlib.Path]]:
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        yield fd, path
    finally:
        os.close(fd)


def _direct_fd(fd: int) -> bool:
    """O_DIRECT on if the file system allows (the tests below then cover the real path)."""
    return enable_direct_io(fd)


SIZES = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, BUFFER - 1, BUFFER, BUFFER + 1,
         5 * BUFFER + 17, 9 * BUFFER]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("piece", [1000, BUFFER, 3 * BUFFER + 5])
def test_content_is_exact_for_every_size_and_write_pattern(
    fd_path: tuple[int, pathlib.Path], size: int, piece: int
) -> None:
    """Aligned body, partial last block and any split of writes reproduce the bytes exactly."""
    fd, path = fd_path
    _direct_fd(fd)
    data = _payload(size)
    f = DirectFile(fd, buffer_bytes=BUFFER)
    for i in range(0, size, piece):
        assert f.write(memoryview(data)[i : i + piece]) == len(data[i : i + piece])
    f.finish()
    assert path.read_bytes() == data


def test_direct_io_is_really_used_where_supported(fd_path: tuple[int, pathlib.Path]) -> None:
    """On a file system that takes O_DIRECT the flag is set on the descriptor."""
    fd, _ = fd_path
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    if not enable_direct_io(fd):
        pytest.skip("this file system refuses O_DIRECT (e.g. tmpfs)")
    import fcntl

    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT


def test_memory_stays_at_three_buffers(fd_path: tuple[int, pathlib.Path]) -> None:
    """However much is written, at most queue depth + 1 buffers exist."""
    fd, path = fd_path
    _direct_fd(fd)
    f = DirectFile(fd, buffer_bytes=BUFFER)
    for _ in range(200):
        f.write(b"\1" * (BUFFER // 3))
        assert len(f._buffers) <= direct_io._QUEUE_DEPTH + 1
    f.finish()
    assert path.stat().st_size == 200 * (BUFFER // 3)


def test_caller_buffer_is_free_when_write_returns(fd_path: tuple[int, pathlib.Path]) -> None:
    """write copies: changing the source afterwards does not change the file."""
    fd, path = fd_path
    _direct_fd(fd)
    src = bytearray(b"a" * (3 * BUFFER))
    f = DirectFile(fd, buffer_bytes=BUFFER)
    f.write(src)
    src[:] = b"b" * len(src)
    f.finish()
    assert path.read_bytes() == b"a" * (3 * BUFFER)


def _failing_write_all(after: int, err: int) -> Callable[[int, memoryview], None]:
    real = direct_io._write_all
    calls = {"n": 0}

    def write_all(fd: int, data: memoryview) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(err, os.strerror(err))
        real(fd, data)

    return write_all


def _write_until_it_fails(f: DirectFile, size: int) -> None:
    """Ten full buffers and a finish: an injected write failure must surface as OSError."""
    with pytest.raises(OSError):
        for _ in range(10):
            f.write(b"x" * size)
        f.finish()
    f.abort()  # stops the write-behind thread


def test_background_failure_reaches_the_next_call(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ENOSPC in the write-behind thread is raised by a later write or by finish, chained."""
    fd, _ = fd_path
    monkeypatch.setattr(direct_io, "_write_all", _failing_write_all(1, errno.ENOSPC))
    f = DirectFile(fd, buffer_bytes=BUFFER)
    with pytest.raises(OSError, match="failed in the background") as info:
        for _ in range(100):
            f.write(b"x" * BUFFER)
        f.finish()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    with pytest.raises(OSError):
        f.finish()  # still failed; never reports success afterwards


def test_einval_on_the_first_write_falls_back_to_buffered(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that takes the flag but refuses the alignment gets page-cache writes instead."""
    fd, path = fd_path
    real = direct_io._write_all
    seen = {"n": 0}

    def write_all(fd_: int, data: memoryview) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd_, data)

    monkeypatch.setattr(direct_io, "_write_all", write_all)
    data = _payload(4 * BUFFER + 3)
    with DirectFile(fd, buffer_bytes=BUFFER) as f:
        f.write(data)
    assert path.read_bytes() == data


def test_einval_after_data_was_written_is_raised(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL past offset 0 is a real error, not a reason to switch modes silently."""
    fd, _ = fd_path
    _direct_fd(fd)
    monkeypatch.setattr(direct_io, "_write_all", _failing_write_all(1, errno.EINVAL))
    _write_until_it_fails(DirectFile(fd, buffer_bytes=BUFFER), BUFFER)


def test_write_after_finish_or_abort_is_refused(fd_path: tuple[int, pathlib.Path]) -> None:
    """A finished or aborted DirectFile refuses writes with ValueError."""
    fd, _ = fd_path
    f = DirectFile(fd, buffer_bytes=BUFFER)
    f.finish()
    with pytest.raises(ValueError, match="finished"):
        f.write(b"x")
    g = DirectFile(fd, buffer_bytes=BUFFER)
    g.write(b"y" * (3 * BUFFER))
    g.abort()
    with pytest.raises(ValueError, match="aborted"):
        g.write(b"x")


def test_enable_direct_io_reports_refusal(monkeypatch: pytest.MonkeyPatch, fd_path: tuple[int, pathlib.Path]) -> None:
    """EINVAL from fcntl (tmpfs) means False; other errors propagate."""
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    import fcntl

    fd, _ = fd_path
    real = fcntl.fcntl

    def refusing(fd_: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing)
    assert enable_direct_io(fd) is False

    def broken(fd_: int, cmd: int, arg: int = 0) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "fcntl", broken)
    with pytest.raises(OSError):
        enable_direct_io(fd)


# -- through atomic_write ---------------------------------------------------
def _writer_kind(tmp_path: pathlib.Path) -> str:
    with atomic_write(str(tmp_path / "probe.bin")) as f:
        kind = type(f).__name__
        f.write(b"z")
    return kind


def test_atomic_write_uses_direct_io_where_possible(tmp_path: pathlib.Path) -> None:
    """The default commit path writes through DirectFile if the file system allows O_DIRECT."""
    fd = os.open(tmp_path / "check", os.O_WRONLY | os.O_CREAT)
    try:
        supported = enable_direct_io(fd)
    finally:
        os.close(fd)
    assert _writer_kind(tmp_path) == ("DirectFile" if supported else "BufferedWriter")


def test_knob_off_or_refused_means_buffered(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCHAUX_DIRECT_IO=0, or a file system refusing O_DIRECT, gives the page-cache writer."""
    with _knobs.override(direct_io=0):
        assert _writer_kind(tmp_path) == "BufferedWriter"
    monkeypatch.setattr(atomic, "enable_direct_io", lambda fd: False)
    assert _writer_kind(tmp_path) == "BufferedWriter"


@pytest.mark.parametrize("direct", [0, 1])
def test_atomic_content_is_exact_on_both_paths(tmp_path: pathlib.Path, direct: int) -> None:
    """The direct and the page-cache path commit the same bytes."""
    target = tmp_path / "ckpt.bin"
    data = _payload(3 * BUFFER + 11)
    with _knobs.override(direct_io=direct, direct_io_buffer_bytes=BUFFER):
        with atomic_write(str(target)) as f:
            f.write(data)
    assert target.read_bytes() == data


def test_background_failure_keeps_old_file_and_no_temp(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EIO in the write-behind thread fails the commit; the old file stays, the temp goes."""
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old checkpoint")
    monkeypatch.setattr(direct_io, "_write_all", _failing_write_all(0, errno.EIO))
    monkeypatch.setattr(atomic, "enable_direct_io", lambda fd: True)  # DirectFile even on tmpfs
    with _knobs.override(direct_io=1, direct_io_buffer_bytes=BUFFER):
        with pytest.raises(OSError, match="failed in the background"):
            with atomic_write(str(target)) as f:
                for _ in range(20):
                    f.write(b"n" * BUFFER)
    assert target.read_bytes() == b"old checkpoint"
    assert os.listdir(tmp_path) == ["ckpt.bin"]


def test_env_knob_is_read(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCHAUX_DIRECT_IO in the environment switches the path."""
    monkeypatch.setenv("TORCHAUX_DIRECT_IO", "0")
    assert _writer_kind(tmp_path) == "BufferedWriter"


# -- reserve / commit (producers that write into the aligned buffer) ---------
def test_reserve_commit_carries_unaligned_tails_across_buffers(fd_path: tuple[int, pathlib.Path]) -> None:
    """Records reserved in place, mixed with writes, come out in order even when they do not tile a buffer."""
    fd, path = fd_path
    _direct_fd(fd)
    f = DirectFile(fd, buffer_bytes=BUFFER)
    expected = bytearray()
    for i in range(40):
        size = (i * 977) % (BUFFER - ALIGNMENT) + 1
        view = f.reserve(size)
        assert view is not None and len(view) == size
        piece = _payload(size + i)[i:]
        view[:] = piece
        view.release()
        f.commit(size)
        expected += piece
        if i % 3 == 0:
            f.write(b"w" * (i + 1))
            expected += b"w" * (i + 1)
    f.finish()
    assert path.read_bytes() == bytes(expected)


def test_reserve_refuses_what_cannot_fit_and_commit_checks_bounds(fd_path: tuple[int, pathlib.Path]) -> None:
    """Too large a reservation returns None; committing more than reserved is a ValueError."""
    fd, _ = fd_path
    f = DirectFile(fd, buffer_bytes=BUFFER)
    assert f.reserve(BUFFER) is None
    view = f.reserve(10)
    assert view is not None
    view.release()
    with pytest.raises(ValueError, match="exceeds"):
        f.commit(11)
    f.commit(10)
    f.finish()


def test_buffers_of_a_finished_file_serve_the_next_one(tmp_path: pathlib.Path) -> None:
    """A clean finish leaves its buffers for the next file; at most one file's worth is kept."""
    size = 3 * ALIGNMENT  # a size no other test uses, so the spare list starts empty
    direct_io._spare.pop(size, None)
    made: list[list[int]] = []
    for name in ("a", "b"):
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            f = DirectFile(fd, buffer_bytes=size)
            f.write(b"q" * (10 * size))
            made.append([id(b) for b in f._buffers])
            f.finish()
        finally:
            os.close(fd)
    assert sorted(made[0]) == sorted(made[1])
    assert len(direct_io._spare[size]) == direct_io._QUEUE_DEPTH + 1
    assert (tmp_path / "b").read_bytes() == b"q" * (10 * size)


def test_buffers_of_a_failed_file_are_not_reused(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a background failure the buffers are dropped (a traceback may still view them)."""
    size = 5 * ALIGNMENT
    direct_io._spare.pop(size, None)
    fd, _ = fd_path
    monkeypatch.setattr(direct_io, "_write_all", _failing_write_all(0, errno.EIO))
    f = DirectFile(fd, buffer_bytes=size)
    _write_until_it_fails(f, size)
    f.abort()
    assert not direct_io._spare.get(size)


def test_failed_finish_leaves_no_thread_behind(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """finish() after a background failure raises and still stops the write-behind thread."""
    import threading

    fd, _ = fd_path
    monkeypatch.setattr(direct_io, "_write_all", _failing_write_all(0, errno.EIO))
    f = DirectFile(fd, buffer_bytes=BUFFER)
    f.write(b"x" * BUFFER)  # hands one buffer to the thread, whose write fails
    thread = f._thread
    assert isinstance(thread, threading.Thread)
    with pytest.raises(OSError, match="failed in the background"):
        f.finish()
    assert not thread.is_alive()
    g = DirectFile(fd, buffer_bytes=BUFFER)
    g.abort()
    with pytest.raises(ValueError, match="aborted"):
        g.finish()


# -- write_retained: staged buffers written in place ------------------------------------


def _aligned_buffer(n: int, shift: int = 0) -> tuple[object, memoryview, int]:
    """A mapping holding the payload ``shift`` bytes past a page boundary: (mapping, view, address)."""
    import ctypes
    import mmap

    m = mmap.mmap(-1, n + shift + 1)
    m[shift : shift + n] = _payload(n)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m)) + shift
    return m, memoryview(m)[shift : shift + n], address


@pytest.mark.parametrize("head", [0, 64, ALIGNMENT - 1, ALIGNMENT + 100])
@pytest.mark.parametrize("size", [(1 << 20) + 8192, (3 << 20) + 17])
def test_write_retained_writes_exact_bytes_in_place(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch, head: int, size: int
) -> None:
    """Bytes before, the retained record and bytes after land exactly; the aligned middle is not copied."""
    fd, path = fd_path
    _direct_fd(fd)
    queued: list[tuple[type, int]] = []
    real_queue = DirectFile._queue

    def spy(self: DirectFile, buf: object, n: int) -> None:
        queued.append((type(buf), n))
        real_queue(self, buf, n)  # type: ignore[arg-type]

    monkeypatch.setattr(DirectFile, "_queue", spy)
    # The record sits in memory at the same offset modulo 4096 as in the file.
    m, view, address = _aligned_buffer(size, shift=head % ALIGNMENT)
    prefix = (bytes(range(256)) * (head // 256 + 1))[:head]
    f = DirectFile(fd, buffer_bytes=1 << 20)
    f.write(prefix)
    assert f.write_retained(view, address) == size
    f.write(b"tail")
    f.finish()
    data = path.read_bytes()
    assert data == prefix + bytes(view) + b"tail"
    in_place = [n for kind, n in queued if kind is memoryview]
    assert in_place and all(n % ALIGNMENT == 0 for n in in_place)
    assert sum(in_place) >= size - 2 * ALIGNMENT
    view.release()
    m.close()  # no view of the caller's buffer is left behind (BufferError otherwise)


def test_write_retained_copies_when_the_address_is_not_congruent(fd_path: tuple[int, pathlib.Path]) -> None:
    """A buffer whose address does not match the file position modulo 4096 is copied, and still exact."""
    fd, path = fd_path
    _direct_fd(fd)
    m, view, address = _aligned_buffer(2 << 20)
    f = DirectFile(fd, buffer_bytes=1 << 20)
    f.write(b"x" * 100)
    f.write_retained(view, address)  # file position 100, address % 4096 == 0: not congruent
    f.finish()
    assert path.read_bytes() == b"x" * 100 + bytes(view)
    view.release()
    m.close()


def test_write_retained_copies_large_pieces_without_the_gil(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copied retained record goes through ctypes.memmove (GIL released), exact across buffers."""
    import ctypes

    fd, path = fd_path
    _direct_fd(fd)
    sizes: list[int] = []
    real = ctypes.memmove

    def spy(dst: int, src: int, n: int) -> int:
        sizes.append(n)
        return real(dst, src, n)

    monkeypatch.setattr(direct_io.ctypes, "memmove", spy)
    m, view, address = _aligned_buffer((5 << 20) + 333, shift=7)
    f = DirectFile(fd, buffer_bytes=1 << 20)
    f.write(b"y" * 100)  # file position 100, address % 4096 == 7: copied
    f.write_retained(view, address)
    f.finish()
    assert path.read_bytes() == b"y" * 100 + bytes(view)
    assert sum(sizes) >= len(view) - (1 << 16) and max(sizes) == 1 << 20
    view.release()
    m.close()


def test_write_retained_failure_reaches_the_caller_and_keeps_errno(
    fd_path: tuple[int, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing a retained buffer in place is raised with its errno (it survives pickling)."""
    import pickle

    fd, _ = fd_path
    monkeypatch.setattr(direct_io, "_write_all", _failing_write_all(0, errno.ENOSPC))
    m, view, address = _aligned_buffer(4 << 20)
    f = DirectFile(fd, buffer_bytes=1 << 20)
    with pytest.raises(OSError, match="failed in the background") as info:
        f.write_retained(view, address)
        f.finish()
    assert info.value.errno == errno.ENOSPC
    assert pickle.loads(pickle.dumps(info.value)).errno == errno.ENOSPC
    f.abort()
    # The error's traceback holds views of the buffer until the error is dropped
    # (as for any exception); once it and the file are gone, nothing exports it.
    del info, f
    import gc

    gc.collect()  # exceptions with tracebacks form cycles
    view.release()
    m.close()  # nothing of DirectFile still exports the caller's buffer
