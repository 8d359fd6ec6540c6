"""async_save="process": ProcessSaver writes in a spawned child, and fails loudly.

One ProcessSaver is shared by the module (spawning costs about a second);
tests that break their writer (kill it, close it) make their own.  Waits go
through handles, FIFOs and locks, never sleeps; pytest-timeout turns a hang
into a failure.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any

import pytest
import torch
from secure_helpers import (
    WAIT_S,
    FifoGateSink,
    NoSpaceSink,
    PidSink,
    UnpicklableErrorSink,
    assert_entries,
    close_process_saver,
    expected_entries,
)
from sinks import background, still_running

import torchaux
from torchaux import SaveClosedError
from torchaux.checkpoint.engine import process_saver as process_saver_module
from torchaux.checkpoint.storage.commit import TEMP_MARKER, atomic_write
from torchaux.checkpoint.engine.process_saver import ProcessSaver

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="ProcessSaver needs /dev/shm"),
]


@pytest.fixture(scope="module")
def saver() -> Iterator[ProcessSaver]:
    """The module's shared writer process."""
    s = ProcessSaver(name="torchaux-test-process-writer")
    yield s
    close_process_saver(s)


@pytest.fixture
def fresh() -> Iterator[list[ProcessSaver]]:
    """A list to append ProcessSavers to; each is closed (and its child ended) at teardown."""
    made: list[ProcessSaver] = []
    yield made
    for s in made:
        close_process_saver(s)


def _state(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value), "b": torch.arange(5)}


def _save(path: Any, saver: ProcessSaver, value: float = 1.0, **kwargs: Any) -> Any:
    kwargs.setdefault("async_save", "process")
    return torchaux.save_checkpoint(_state(value), path, saver=saver, **kwargs)


def _loads_as(path: Any, value: float) -> None:
    assert_entries(torchaux.load_checkpoint(path), expected_entries(_state(value)))


# -- where the write happens ------------------------------------------------------


def test_write_happens_in_child_process(tmp_path: Any, saver: ProcessSaver) -> None:
    """The file is written by the saver's child, not by this process."""
    path = str(tmp_path / "m.ckpt")
    saver.sink = PidSink()
    try:
        _save(path, saver).wait(WAIT_S)
    finally:
        saver.sink = atomic_write
    with open(path + ".pid") as f:
        writer_pid = int(f.read())
    assert writer_pid != os.getpid()
    assert writer_pid == saver._proc.pid
    _loads_as(path, 1.0)


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_process_save_with_everything(tmp_path: Any, saver: ProcessSaver, fmt: str) -> None:
    """Encryption, CRC and append_dict all work through the child."""
    path = str(tmp_path / "m")
    handle = _save(path, saver, enc_key=bytes(24), crc_check=True, format=fmt,
                   append_dict={"epoch": 4, "note": "x"})
    assert handle.wait(WAIT_S) == os.path.realpath(path)
    loaded = torchaux.load_checkpoint(path, dec_key=bytes(24), crc_check=True)
    assert_entries(loaded, expected_entries(_state(), {"epoch": 4, "note": "x"}))


# -- shared memory ----------------------------------------------------------------------


def test_no_shared_memory_left_after_close(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, fresh: list[ProcessSaver]
) -> None:
    """Every /dev/shm segment a saver creates exists while it runs and is gone after close()."""
    created: list[str] = []

    class Recording(shared_memory.SharedMemory):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self.name.lstrip("/"))

    monkeypatch.setattr(process_saver_module, "SharedMemory", Recording)
    before = set(os.listdir("/dev/shm"))
    s = ProcessSaver()
    fresh.append(s)
    for i, shape in enumerate([(4,), (64, 64), (3, 5)]):
        torchaux.save_checkpoint({"t": torch.ones(shape)}, tmp_path / f"{i}.ckpt",
                                 async_save="process", saver=s, enc_key=bytes(16)).wait(WAIT_S)
    listing = set(os.listdir("/dev/shm"))
    assert len(created) == 3  # one segment per size
    assert created[-1] in listing - before  # the last save's buffer is cached for the next
    # Each new size evicted (and unlinked) the older ones: the pool is bounded.
    assert set(created[:-1]) & listing == set()
    s.close(timeout=WAIT_S)
    assert set(created) & set(os.listdir("/dev/shm")) == set()


# -- failures reach the caller ------------------------------------------------------------


def test_child_error_reaches_wait_and_saver_recovers(tmp_path: Any, saver: ProcessSaver) -> None:
    """An OSError raised in the child is re-raised by wait() as itself; the old file survives."""
    path = tmp_path / "m.ckpt"
    _save(path, saver, 1.0).wait(WAIT_S)
    saver.sink = NoSpaceSink()
    try:
        handle = _save(path, saver, 2.0)
        with pytest.raises(OSError, match="No space left") as info:
            handle.wait(WAIT_S)
    finally:
        saver.sink = atomic_write
    assert info.value.errno == errno.ENOSPC
    _loads_as(path, 1.0)
    _save(path, saver, 3.0).wait(WAIT_S)
    _loads_as(path, 3.0)


def test_synchronous_save_raises_child_error(tmp_path: Any, saver: ProcessSaver) -> None:
    """async_save=False through a ProcessSaver raises the child's error from save_checkpoint."""
    saver.sink = NoSpaceSink()
    try:
        with pytest.raises(OSError, match="No space left"):
            _save(tmp_path / "m.ckpt", saver, async_save=False)
    finally:
        saver.sink = atomic_write
    assert os.listdir(tmp_path) == []


def test_directory_removed_after_validation(tmp_path: Any, saver: ProcessSaver) -> None:
    """A directory deleted after the call but before the write: wait() raises FileNotFoundError."""
    target_dir = tmp_path / "sub"
    target_dir.mkdir()
    with saver._proc_lock:  # the write cannot start before the directory is gone
        handle = _save(target_dir / "m.ckpt", saver)
        shutil.rmtree(target_dir)
    with pytest.raises(FileNotFoundError):
        handle.wait(WAIT_S)


def test_unpicklable_child_error_still_reported(tmp_path: Any, saver: ProcessSaver) -> None:
    """A child exception that cannot be pickled arrives as RuntimeError with its type and text."""
    saver.sink = UnpicklableErrorSink()
    try:
        handle = _save(tmp_path / "m.ckpt", saver)
        with pytest.raises(RuntimeError, match="_Unpicklable: writer failed"):
            handle.wait(WAIT_S)
    finally:
        saver.sink = atomic_write


def test_unobserved_failure_raised_by_next_save(tmp_path: Any, saver: ProcessSaver) -> None:
    """A failed process save nobody waited on is raised by the next save, once."""
    saver.sink = NoSpaceSink()
    try:
        _save(tmp_path / "a.ckpt", saver)  # max_pending=1: the next save waits for it
    finally:
        saver.sink = atomic_write
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path / "b.ckpt", saver)
    _save(tmp_path / "b.ckpt", saver).wait(WAIT_S)
    _loads_as(tmp_path / "b.ckpt", 1.0)


def test_save_after_close_is_refused(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """A closed ProcessSaver refuses new saves with SaveClosedError and writes nothing."""
    s = ProcessSaver()
    fresh.append(s)
    s.close()
    with pytest.raises(SaveClosedError):
        _save(tmp_path / "m.ckpt", s)
    assert os.listdir(tmp_path) == []


# -- back-pressure --------------------------------------------------------------------------------


def test_back_pressure_one_pending(tmp_path: Any, saver: ProcessSaver) -> None:
    """With max_pending=1, a second save waits until the first has been written."""
    with saver._proc_lock:  # holds the first save in the writer
        first = _save(tmp_path / "a.ckpt", saver, 1.0)
        second = background(_save, tmp_path / "b.ckpt", saver, 2.0)
        assert still_running(second), "the second save should wait for a staging slot"
        assert not first.done()
    second.result(WAIT_S).wait(WAIT_S)
    assert first.wait(WAIT_S)
    _loads_as(tmp_path / "a.ckpt", 1.0)
    _loads_as(tmp_path / "b.ckpt", 2.0)


def test_back_pressure_two_pending(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """With max_pending=2, two saves are accepted at once and the third waits."""
    s = ProcessSaver(max_pending=2)
    fresh.append(s)
    with s._proc_lock:
        handles = [_save(tmp_path / f"{i}.ckpt", s, float(i)) for i in range(2)]
        third = background(_save, tmp_path / "2.ckpt", s, 2.0)
        assert still_running(third)
    handles.append(third.result(WAIT_S))
    for i, h in enumerate(handles):
        h.wait(WAIT_S)
        _loads_as(tmp_path / f"{i}.ckpt", float(i))


# -- a dead child --------------------------------------------------------------------------------


def _started(tmp_path: Any) -> ProcessSaver:
    s = ProcessSaver()
    _save(tmp_path / "first.ckpt", s).wait(WAIT_S)
    assert s._proc is not None and s._proc.is_alive()
    return s


@pytest.mark.slow
def test_killed_idle_child_is_replaced(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """After the idle child is SIGKILLed (and reaped), the next save starts a new child."""
    s = _started(tmp_path)
    fresh.append(s)
    old = s._proc
    os.kill(old.pid, signal.SIGKILL)
    old.join(WAIT_S)
    _save(tmp_path / "m.ckpt", s, 5.0).wait(WAIT_S)
    assert s._proc.pid != old.pid
    _loads_as(tmp_path / "m.ckpt", 5.0)


@pytest.mark.slow
def test_save_right_after_kill_fails_clearly_or_succeeds(
    tmp_path: Any, fresh: list[ProcessSaver]
) -> None:
    """A save right after the child is SIGKILLed succeeds or raises "writer process died"."""
    s = _started(tmp_path)
    fresh.append(s)
    for round_ in range(3):
        old = s._proc
        os.kill(old.pid, signal.SIGKILL)
        try:
            _save(tmp_path / "m.ckpt", s, float(round_)).wait(WAIT_S)
        except RuntimeError as exc:
            assert "writer process died" in str(exc)
        old.join(WAIT_S)
        _save(tmp_path / "m.ckpt", s, 9.0).wait(WAIT_S)
        _loads_as(tmp_path / "m.ckpt", 9.0)


@pytest.mark.slow
def test_close_after_child_died(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """close() of a saver whose child was killed returns normally."""
    s = _started(tmp_path)
    fresh.append(s)
    os.kill(s._proc.pid, signal.SIGKILL)
    s._proc.join(WAIT_S)
    s.close(timeout=WAIT_S)


@pytest.mark.slow
def test_child_killed_mid_write(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """SIGKILL while the child writes: wait() raises a clear error and the old file is intact."""
    s = _started(tmp_path)
    fresh.append(s)
    path = tmp_path / "m.ckpt"
    _save(path, s, 1.0).wait(WAIT_S)
    entered, gate = str(tmp_path / "entered.fifo"), str(tmp_path / "gate.fifo")
    os.mkfifo(entered)
    os.mkfifo(gate)
    s.sink = FifoGateSink(entered, gate)
    handle = _save(path, s, 2.0)
    with open(entered) as f:
        writer_pid = int(f.read())
    assert writer_pid == s._proc.pid
    old = s._proc
    os.kill(writer_pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="writer process died"):
        handle.wait(WAIT_S)
    _loads_as(path, 1.0)
    old.join(WAIT_S)
    s.sink = atomic_write
    _save(path, s, 3.0).wait(WAIT_S)
    _loads_as(path, 3.0)
    leftovers = [n for n in os.listdir(tmp_path) if TEMP_MARKER in n]
    assert len(leftovers) <= 1, "only the killed write's temp file may remain"


# -- engine hardening (issue #14.4) ----------------------------------------------------------------


def test_child_never_runs_the_users_main(tmp_path: Any) -> None:
    """A script without a __main__ guard runs its top-level code once: the writer never re-imports it."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import os, torch, torchaux\n"
        "print('top-level code ran', flush=True)\n"
        f"h = torchaux.save_checkpoint({{'w': torch.ones(3)}}, {str(tmp_path / 'p.ckpt')!r}, async_save='process')\n"
        "print('result', repr(h.exception(60)), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("top-level code ran") == 1, proc.stdout
    assert "result None" in proc.stdout
    _loads_as_ones = torchaux.load_checkpoint(str(tmp_path / "p.ckpt"))
    assert torch.equal(_loads_as_ones["w"], torch.ones(3))


def test_remove_stale_temps_spares_an_in_flight_process_save(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """While the child writes (its temp named with the child's pid), remove_stale_temps keeps that temp."""
    from torchaux.checkpoint.storage.commit import remove_stale_temps

    s = ProcessSaver()
    fresh.append(s)
    entered, gate = str(tmp_path / "entered.fifo"), str(tmp_path / "gate.fifo")
    os.mkfifo(entered)
    os.mkfifo(gate)
    s.sink = FifoGateSink(entered, gate)
    out = tmp_path / "out"
    out.mkdir()
    handle = _save(out / "m.ckpt", s, 4.0)
    with open(entered) as f:
        f.read()
    temps = [n for n in os.listdir(out) if TEMP_MARKER in n]
    assert len(temps) == 1
    assert remove_stale_temps(out) == []
    with open(gate, "w") as f:
        f.write("go\n")
    assert handle.wait(WAIT_S)
    _loads_as(out / "m.ckpt", 4.0)


def test_zero_size_tensors_use_no_shared_memory(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, fresh: list[ProcessSaver]
) -> None:
    """Empty tensors create no segment, and close() leaves nothing in /dev/shm."""
    created: list[str] = []

    class Recording(shared_memory.SharedMemory):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self.name.lstrip("/"))

    monkeypatch.setattr(process_saver_module, "SharedMemory", Recording)
    s = ProcessSaver()
    fresh.append(s)
    state = {f"empty{i}": torch.zeros(0) for i in range(5)} | {"w": torch.ones(3)}
    torchaux.save_checkpoint(state, tmp_path / "z.ckpt", async_save="process", saver=s).wait(WAIT_S)
    assert len(created) == 1  # the one non-empty tensor
    s.close(timeout=WAIT_S)
    assert set(created) & set(os.listdir("/dev/shm")) == set()
    loaded = torchaux.load_checkpoint(str(tmp_path / "z.ckpt"))
    assert all(loaded[f"empty{i}"].numel() == 0 for i in range(5))


@pytest.mark.slow
def test_crashed_childs_temp_file_is_removed(tmp_path: Any, fresh: list[ProcessSaver]) -> None:
    """SIGKILL of the child mid-write: the parent removes the temp file the child left."""
    s = _started(tmp_path)
    fresh.append(s)
    out = tmp_path / "out"
    out.mkdir()
    entered, gate = str(tmp_path / "entered.fifo"), str(tmp_path / "gate.fifo")
    os.mkfifo(entered)
    os.mkfifo(gate)
    s.sink = FifoGateSink(entered, gate)
    handle = _save(out / "m.ckpt", s, 2.0)
    with open(entered) as f:
        writer_pid = int(f.read())
    assert [n for n in os.listdir(out) if TEMP_MARKER in n]
    os.kill(writer_pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="temp file was removed"):
        handle.wait(WAIT_S)
    assert os.listdir(out) == []
    s.sink = atomic_write


def test_dropped_process_saver_stops_its_child_and_frees_segments(tmp_path: Any) -> None:
    """A ProcessSaver dropped without close(): its child ends, its thread ends, no segment remains."""
    import gc

    s = ProcessSaver()
    _save(tmp_path / "a.ckpt", s).wait(WAIT_S)
    segments = [shm.name.lstrip("/") for shm in s.pool._segments.values()]
    proc, thread = s._proc, s._thread
    assert segments and proc is not None and thread is not None
    del s
    gc.collect()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    proc.join(WAIT_S)
    assert not proc.is_alive()
    assert set(segments) & set(os.listdir("/dev/shm")) == set()
