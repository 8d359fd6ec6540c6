"""AsyncSaver / SaveHandle: lifecycle, failure surfacing, back-pressure, ordering, pool reuse."""

from __future__ import annotations

import concurrent.futures
import errno
import gc
import io
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable

import pytest
import torch
from compare import assert_identical, load
from sinks import WAIT_S, FailingSink, GatedSink, RecordingSink, background, busy_writer, still_running

import torchaux
from torchaux import AsyncSaver, CheckpointError, SaveClosedError, SaveHandle, _knobs
from torchaux.checkpoint.storage.commit import TEMP_MARKER

MakeSaver = Callable[..., AsyncSaver]


def state(i: int = 0, n: int = 10_000) -> dict[str, object]:
    return {"step": i, "w": torch.full((n,), float(i)), "b": torch.arange(7) + i}


def listdir(path: pathlib.Path) -> list[str]:
    return sorted(os.listdir(path))


# -- lifecycle ------------------------------------------------------------------


def test_staged_resolves_before_committed(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """`staged` resolves while the write is still blocked; `committed` only once the file is in place."""
    sink = GatedSink()
    saver = make_saver(sink=sink)
    path = tmp_path / "ckpt.pt"
    handle = torchaux.save_async(state(1), path, saver=saver)
    assert handle.staged.result(timeout=WAIT_S) is None
    assert sink.entered.wait(WAIT_S)
    assert not handle.committed.done()
    assert not handle.done()
    assert "staged" in repr(handle)
    assert not path.exists()
    sink.release()
    assert handle.wait(timeout=WAIT_S) == str(path)
    assert handle.done()
    assert "committed" in repr(handle)
    assert_identical(load(str(path)), state(1))


def test_wait_with_timeout_raises_timeout_error(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """wait(timeout) raises TimeoutError while the save is blocked, then returns the path once done."""
    sink = GatedSink()
    saver = make_saver(sink=sink)
    handle = torchaux.save_async(state(), tmp_path / "ckpt.pt", saver=saver)
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.05)
    sink.release()
    assert handle.wait(timeout=WAIT_S) == str(tmp_path / "ckpt.pt")


def test_file_object_target_resolves_to_none(saver: AsyncSaver) -> None:
    """A save to a file object commits to None and leaves a complete checkpoint in it."""
    buf = io.BytesIO()
    handle = torchaux.save_async(state(3), buf, saver=saver)
    assert handle.wait(timeout=WAIT_S) is None
    assert handle.committed.result() is None
    assert_identical(load(buf.getvalue()), state(3))


# -- failures ---------------------------------------------------------------------


@pytest.mark.parametrize("fail_after", [0, 100, 20_000], ids=["first-byte", "in-header", "in-data"])
def test_failed_write_reraises_original_exception_and_keeps_previous_file(
    make_saver: MakeSaver, tmp_path: pathlib.Path, fail_after: int
) -> None:
    """A write that fails mid-file re-raises the sink's own exception; the old file stays, no temp remains."""
    path = tmp_path / "ckpt.pt"
    torch.save(state(1), path)
    before = path.read_bytes()
    sink = FailingSink(fail_after=fail_after)
    saver = make_saver(sink=sink)
    handle = torchaux.save_async(state(2), path, saver=saver)
    with pytest.raises(OSError) as info:
        handle.wait(timeout=WAIT_S)
    assert len(sink.raised) == 1
    assert info.value is sink.raised[0]
    assert info.value.errno == errno.ENOSPC
    assert handle.exception() is sink.raised[0]
    assert handle.staged.exception() is None  # the failure came after staging
    assert "failed" in repr(handle)
    assert path.read_bytes() == before
    assert listdir(tmp_path) == ["ckpt.pt"]


def test_failed_save_returns_its_buffers_to_the_pool(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """The staging buffers of a failed save go back to the pool (no leak per failure)."""
    saver = make_saver(sink=FailingSink(failures=1))
    obj = state(1)
    nbytes = sum(t.untyped_storage().nbytes() for t in (obj["w"], obj["b"]))  # type: ignore[union-attr]
    assert torchaux.save_async(obj, tmp_path / "a.pt", saver=saver).exception(WAIT_S) is not None
    assert saver.pool.cached_bytes() == nbytes
    torchaux.save_async(obj, tmp_path / "b.pt", saver=saver).wait(WAIT_S)
    assert saver.pool.cached_bytes() == nbytes
    assert_identical(load(str(tmp_path / "b.pt")), obj)


def test_unobserved_failure_is_raised_by_the_next_save_once(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """Nobody waits on a failed save: the next save_async raises its exception, once, and writes nothing."""
    sink = FailingSink(failures=1)
    saver = make_saver(sink=sink, max_pending=1)  # the next save waits for the failed one to finish
    torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    with pytest.raises(OSError) as info:
        torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver)
    assert info.value is sink.raised[0]
    assert sink.opened == 1  # the raising call never reached the sink
    assert listdir(tmp_path) == []
    handle = torchaux.save_async(state(3), tmp_path / "b.pt", saver=saver)
    assert handle.wait(timeout=WAIT_S) == str(tmp_path / "b.pt")
    assert_identical(load(str(tmp_path / "b.pt")), state(3))


@pytest.mark.parametrize("observe", ["wait", "exception"])
def test_observed_failure_is_not_reraised(make_saver: MakeSaver, tmp_path: pathlib.Path, observe: str) -> None:
    """A failure seen through wait() or exception() is not raised again by the next save."""
    sink = FailingSink(failures=1)
    saver = make_saver(sink=sink)
    handle = torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    if observe == "wait":
        with pytest.raises(OSError):
            handle.wait(timeout=WAIT_S)
    else:
        assert handle.exception(timeout=WAIT_S) is sink.raised[0]
    ok = torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver)
    assert ok.wait(timeout=WAIT_S) == str(tmp_path / "b.pt")
    saver.wait(timeout=WAIT_S)  # nothing left to raise


@pytest.mark.parametrize("flush", ["wait_saves", "saver.wait"])
def test_flush_raises_unobserved_failure_once(make_saver: MakeSaver, tmp_path: pathlib.Path, flush: str) -> None:
    """wait_saves() / AsyncSaver.wait() raise an unobserved failure (same object), and only the first time."""
    sink = FailingSink(failures=1)
    saver = make_saver(sink=sink)
    torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)

    def do_flush() -> None:
        if flush == "wait_saves":
            torchaux.wait_saves(timeout=WAIT_S)
        else:
            saver.wait(timeout=WAIT_S)

    with pytest.raises(OSError) as info:
        do_flush()
    assert info.value is sink.raised[0]
    do_flush()
    torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver).wait(timeout=WAIT_S)


def test_wait_saves_raises_each_failure_once_across_calls(
    make_saver: MakeSaver, tmp_path: pathlib.Path
) -> None:
    """With failures on two savers, each wait_saves call raises one of them, then none is left."""
    sinks = [FailingSink(failures=1), FailingSink(failures=1)]
    for i, sink in enumerate(sinks):
        torchaux.save_async(state(i), tmp_path / f"{i}.pt", saver=make_saver(sink=sink))
    raised = []
    for _ in range(2):
        with pytest.raises(OSError) as info:
            torchaux.wait_saves(timeout=WAIT_S)
        raised.append(info.value)
    errors = [s.raised[0] for s in sinks]
    assert {id(e) for e in raised} == {id(e) for e in errors}
    torchaux.wait_saves(timeout=WAIT_S)


def test_second_unobserved_failure_of_one_saver_is_not_lost(
    make_saver: MakeSaver, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two unobserved failures on one saver: after the first is raised, the second is still raised or logged."""
    failing = FailingSink(failures=2)
    sink = GatedSink(inner=failing)
    saver = make_saver(sink=sink, max_pending=2)
    h1 = torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    h2 = torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver)
    sink.release()
    concurrent.futures.wait([h1.committed, h2.committed], timeout=WAIT_S)  # not an observation
    assert h1.done() and h2.done()
    err1, err2 = failing.raised
    with pytest.raises(OSError) as info:
        torchaux.save_async(state(3), tmp_path / "c.pt", saver=saver)
    assert info.value is err1
    surfaced: list[BaseException] = []
    with caplog.at_level(logging.ERROR, logger="torchaux"):
        try:
            saver.wait(timeout=WAIT_S)
        except OSError as exc:
            surfaced.append(exc)
    surfaced += [r.exc_info[1] for r in caplog.records if r.exc_info and r.exc_info[1]]
    assert any(e is err2 for e in surfaced)


def test_failure_after_a_timed_out_wait_is_still_surfaced(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """A save that fails after wait(timeout) timed out is raised by the next save_async."""
    failing = FailingSink(failures=1)
    sink = GatedSink(inner=failing)
    saver = make_saver(sink=sink, max_pending=1)
    handle = torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.01)  # the caller saw no failure: the save had not failed yet
    sink.release()
    concurrent.futures.wait([handle.committed], timeout=WAIT_S)  # not an observation
    assert "failed" in repr(handle)  # nor is repr
    with pytest.raises(OSError) as info:
        torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver)
    assert info.value is failing.raised[0]


@pytest.mark.multiprocess
def test_failed_write_does_not_abort_the_process(tmp_path: pathlib.Path) -> None:
    """A write failure (sink or file object) is an exception, never a crash when it is garbage collected."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import gc, io, os, sys
            sys.path.insert(0, sys.argv[1])
            import torch, torchaux
            from sinks import FailingSink

            class BrokenFile(io.RawIOBase):
                def writable(self): return True
                def write(self, b): raise OSError(5, "injected EIO")

            saver = torchaux.AsyncSaver(sink=FailingSink(fail_after=100))
            obj = {"w": torch.ones(1000)}
            h1 = torchaux.save_async(obj, os.path.join(sys.argv[2], "x.pt"), saver=saver)
            e1 = h1.exception()
            h2 = torchaux.save_async(obj, BrokenFile(), saver=saver)
            e2 = h2.exception()
            print(type(e1).__name__, type(e2).__name__, flush=True)
            del e1, e2
            del h1, h2
            gc.collect()
            saver.close()
            gc.collect()
            print("clean exit", flush=True)
            """
        )
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(pathlib.Path(__file__).parent.parent), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["OSError OSError", "clean exit"], proc.stdout
    assert os.listdir(out_dir) == []


# -- back-pressure, ordering, close ---------------------------------------------------


@pytest.mark.parametrize("limit,source", [(1, "arg"), (2, "arg"), (2, "knob")])
def test_back_pressure_blocks_the_save_after_max_pending(
    make_saver: MakeSaver, tmp_path: pathlib.Path, limit: int, source: str
) -> None:
    """With the writer stuck, `max_pending` saves return at once and the next one blocks until it frees up."""
    sink = GatedSink()
    if source == "arg":
        saver = make_saver(sink=sink, max_pending=limit)
    else:
        with _knobs.override(max_pending_saves=limit):
            saver = make_saver(sink=sink)
    handles = []
    for i in range(limit):
        call = background(torchaux.save_async, state(i), tmp_path / f"{i}.pt", saver=saver)
        handles.append(call.result(timeout=WAIT_S))
    assert sink.entered.wait(WAIT_S)
    blocked = background(torchaux.save_async, state(limit), tmp_path / f"{limit}.pt", saver=saver)
    assert still_running(blocked)
    assert not (tmp_path / "0.pt").exists()
    sink.release()
    handles.append(blocked.result(timeout=WAIT_S))
    for i, handle in enumerate(handles):
        assert handle.wait(timeout=WAIT_S) == str(tmp_path / f"{i}.pt")
        assert_identical(load(str(tmp_path / f"{i}.pt")), state(i))


def test_saves_to_one_path_commit_in_submission_order(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """Queued saves to one path are committed one after another in call order; the last one wins."""
    committed_steps: list[int] = []
    sink = GatedSink(inner=RecordingSink(lambda p: committed_steps.append(load(p)["step"])))
    saver = make_saver(sink=sink, max_pending=6)
    path = tmp_path / "ckpt.pt"
    handles = [torchaux.save_async(state(i, n=1000), path, saver=saver) for i in range(6)]
    sink.release()
    assert [h.wait(timeout=WAIT_S) for h in handles] == [str(path)] * 6
    assert committed_steps == list(range(6))
    assert_identical(load(str(path)), state(5, n=1000))
    assert listdir(tmp_path) == ["ckpt.pt"]


def test_close_flushes_pending_saves_then_rejects_new_ones(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """close() waits for queued saves, frees the pool, and later saves raise SaveClosedError."""
    sink = GatedSink()
    saver = make_saver(sink=sink, max_pending=3)
    handles = [torchaux.save_async(state(i), tmp_path / f"{i}.pt", saver=saver) for i in range(3)]
    closing = background(saver.close, timeout=WAIT_S)
    assert still_running(closing)
    sink.release()
    closing.result(timeout=WAIT_S)
    assert all(h.done() for h in handles)
    for i in range(3):
        assert_identical(load(str(tmp_path / f"{i}.pt")), state(i))
    assert saver.pool.cached_bytes() == 0
    with pytest.raises(SaveClosedError, match="closed"):
        torchaux.save_async(state(9), tmp_path / "9.pt", saver=saver)
    assert issubclass(SaveClosedError, RuntimeError) and issubclass(SaveClosedError, CheckpointError)
    assert not (tmp_path / "9.pt").exists()


def test_wait_saves_waits_for_every_saver(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """wait_saves() blocks until a blocked save on any saver has committed."""
    sink = GatedSink()
    handle = torchaux.save_async(state(1), tmp_path / "a.pt", saver=make_saver(sink=sink))
    flushing = background(torchaux.wait_saves, timeout=WAIT_S)
    assert still_running(flushing)
    sink.release()
    flushing.result(timeout=WAIT_S)
    assert handle.done()
    assert_identical(load(str(tmp_path / "a.pt")), state(1))


def test_default_saver_is_used_without_saver_argument(tmp_path: pathlib.Path) -> None:
    """save_async without saver= goes through the process-wide default saver."""
    from torchaux.checkpoint.engine.saver import default_saver

    assert default_saver() is default_saver()
    handle = torchaux.save_async(state(4), tmp_path / "d.pt")
    assert handle.wait(timeout=WAIT_S) == str(tmp_path / "d.pt")
    assert_identical(load(str(tmp_path / "d.pt")), state(4))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_max_pending_must_be_a_positive_int(bad: object) -> None:
    """AsyncSaver(max_pending=...) rejects values that are not ints >= 1."""
    with pytest.raises(ValueError, match="max_pending"):
        AsyncSaver(max_pending=bad)  # type: ignore[arg-type]


# -- buffer pool ----------------------------------------------------------------------


def test_repeated_saves_reuse_the_same_pool_buffers(
    saver: AsyncSaver, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 saves of one state acquire the very same 3 host buffers; the pool then caches one state."""
    obj = {"a": torch.randn(1000), "b": torch.randn(10, 10), "c": torch.arange(7)}
    nbytes = sum(t.untyped_storage().nbytes() for t in obj.values())
    acquired: list[torch.UntypedStorage] = []
    original = saver.pool.acquire_many

    def recording_acquire(requests: list[tuple[int, bool]]) -> list[torch.UntypedStorage]:
        bufs = original(requests)
        acquired.extend(bufs)  # keeps them alive, so ids stay unique
        return bufs

    monkeypatch.setattr(saver.pool, "acquire_many", recording_acquire)
    path = tmp_path / "ckpt.pt"
    for _ in range(20):
        for t in obj.values():
            t.add_(1)
        torchaux.save_async(obj, path, saver=saver).wait(timeout=WAIT_S)
        assert saver.pool.cached_bytes() == nbytes
    assert len(acquired) == 60
    first = {id(b) for b in acquired[:3]}
    assert len(first) == 3
    assert {id(b) for b in acquired} == first
    assert_identical(load(str(path)), obj)
    assert not any(TEMP_MARKER in name for name in os.listdir(tmp_path))


# -- engine hardening (issue #14.2, #14.3, #14.5, #15.5) ------------------------------------


def test_committed_future_cannot_be_cancelled(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """cancel() on a pending save's futures returns False, and the writer serves the next save."""
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    handle = torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    assert handle.committed.cancel() is False
    assert handle.staged.cancel() is False
    sink.release()
    assert handle.wait(WAIT_S) == str(tmp_path / "a.pt")
    assert torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver).wait(WAIT_S)
    blocker.wait(WAIT_S)


@pytest.mark.parametrize("observe", ["result", "exception"])
def test_failure_observed_through_committed_is_not_raised_again(
    make_saver: MakeSaver, tmp_path: pathlib.Path, observe: str
) -> None:
    """A failure seen via handle.committed.result()/.exception(): the next save is performed."""
    sink = FailingSink(failures=1)
    saver = make_saver(sink=sink)
    h1 = torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    if observe == "result":
        with pytest.raises(OSError):
            h1.committed.result(WAIT_S)
    else:
        assert h1.committed.exception(WAIT_S) is sink.raised[0]
    h2 = torchaux.save_async(state(2), tmp_path / "b.pt", saver=saver)
    assert h2.wait(WAIT_S) == str(tmp_path / "b.pt")
    assert_identical(load(str(tmp_path / "b.pt")), state(2))


def test_done_callback_that_saves_again_does_not_deadlock(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """A committed-callback (on the writer thread) saves again; with max_pending=1 both files land."""
    sink = GatedSink()
    saver = make_saver(max_pending=1, sink=sink)
    started: list[SaveHandle] = []
    on_writer: list[bool] = []

    called = threading.Event()

    def callback(_: object) -> None:
        on_writer.append(threading.current_thread() is saver._thread)
        started.append(torchaux.save_async({"latest": 1}, tmp_path / "latest.pt", saver=saver))
        called.set()

    first = torchaux.save_async(state(1), tmp_path / "step1.pt", saver=saver)
    first.committed.add_done_callback(callback)
    sink.release()
    assert first.wait(WAIT_S)
    # Another caller competes for the slot the callback's save would wait for.
    nxt = background(lambda: torchaux.save_async(state(2), tmp_path / "step2.pt", saver=saver).wait(WAIT_S))
    assert nxt.result(WAIT_S) == str(tmp_path / "step2.pt")
    assert called.wait(WAIT_S)
    assert on_writer == [True]
    assert len(started) == 1 and started[0].wait(WAIT_S) == str(tmp_path / "latest.pt")
    assert load(str(tmp_path / "latest.pt")) == {"latest": 1}


def test_waiting_on_the_writer_thread_raises_instead_of_hanging(
    make_saver: MakeSaver, tmp_path: pathlib.Path
) -> None:
    """handle.wait() / wait_saves() inside a done-callback raise CheckpointError at once."""
    sink = GatedSink()
    saver = make_saver(sink=sink)
    errors: list[BaseException] = []
    finished = threading.Event()  # callbacks run after waiters are woken

    def callback(_: object) -> None:
        inner = torchaux.save_async({"x": 1}, tmp_path / "inner.pt", saver=saver)
        for wait in (inner.wait, saver.wait):
            try:
                wait()
            except CheckpointError as exc:
                errors.append(exc)
        finished.set()

    first = torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver)
    first.committed.add_done_callback(callback)
    sink.release()
    first.wait(WAIT_S)
    assert finished.wait(WAIT_S)
    saver.wait(WAIT_S)
    assert len(errors) == 2 and all("writer thread" in str(e) for e in errors)
    assert load(str(tmp_path / "inner.pt")) == {"x": 1}


class _RaiseSignalWhenPickled:
    """Raises SIGUSR1 in this process while staging pickles it (on the caller's thread)."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        os.kill(os.getpid(), signal.SIGUSR1)
        return (dict, ())


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_save_from_a_signal_handler_during_staging(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """The preemption pattern: a handler saves (and waits) while its thread is inside staging."""
    saver = make_saver(max_pending=1)
    done: list[str | None] = []

    def on_signal(signum: int, frame: object) -> None:
        done.append(torchaux.save_async({"emergency": 1}, tmp_path / "em.pt", saver=saver).wait(WAIT_S))

    old = signal.signal(signal.SIGUSR1, on_signal)
    try:
        regular = torchaux.save_async({"w": torch.ones(3), "s": _RaiseSignalWhenPickled()},
                                      tmp_path / "reg.pt", saver=saver)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert done == [str(tmp_path / "em.pt")]
    assert regular.wait(WAIT_S) == str(tmp_path / "reg.pt")
    assert load(str(tmp_path / "em.pt")) == {"emergency": 1}


def test_save_where_no_thread_can_start_is_written_inline(
    make_saver: MakeSaver, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter shutdown Python >= 3.12 refuses new threads: the save is written on the caller."""
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    saver = make_saver()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    handle = torchaux.save_async(state(4), tmp_path / "x.pt", saver=saver)
    assert handle.done()
    monkeypatch.undo()
    assert handle.wait(WAIT_S) == str(tmp_path / "x.pt")
    assert_identical(load(str(tmp_path / "x.pt")), state(4))


def test_dropped_saver_is_collected_and_its_thread_ends(tmp_path: pathlib.Path) -> None:
    """An AsyncSaver dropped without close(): the saver, its pool and its writer thread go away."""
    saver = AsyncSaver(name="torchaux-test-dropped")
    torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver).wait(WAIT_S)
    thread = saver._thread
    assert thread is not None and thread.is_alive()
    ref = weakref.ref(saver)
    del saver
    gc.collect()
    assert ref() is None
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_nothing_of_a_save_is_retained_after_it_completes(saver: AsyncSaver) -> None:
    """After wait(), neither the target file object nor the saved tensors are kept alive (no GC needed)."""
    class Buf(io.BytesIO):
        pass

    target, tensor = Buf(), torch.ones(1 << 16)
    refs = [weakref.ref(target), weakref.ref(tensor)]
    gc.disable()  # cycles would hide until a collection: there must be none
    try:
        torchaux.save_async({"w": tensor}, target, saver=saver).wait(WAIT_S)
        del target, tensor
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_close_and_idle_trim_free_the_pool(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """The pool's cached buffers are freed after TORCHAUX_POOL_IDLE_TRIM_S idle seconds, and by close()."""
    saver = make_saver()
    with _knobs.override(pool_idle_trim_s=1):
        torchaux.save_async(state(1), tmp_path / "a.pt", saver=saver).wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while saver.pool.cached_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling an outcome, not asserting a duration
        assert saver.pool.cached_bytes() == 0
    other = make_saver()
    torchaux.save_async(state(1), tmp_path / "b.pt", saver=other).wait(WAIT_S)
    assert other.pool.cached_bytes() > 0
    other.close()
    assert other.pool.cached_bytes() == 0


def _in_function(thread_id: int, name: str) -> bool:
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_save_from_a_signal_handler_while_waiting_for_a_slot(
    make_saver: MakeSaver, tmp_path: pathlib.Path
) -> None:
    """The signal lands while the main thread waits in reserve() for the only slot: no hang."""
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    saver._slots.acquire()  # the busy writer holds one slot; take the second: max_pending is now full
    handler_saving = threading.Event()
    done: list[str | None] = []

    def on_signal(signum: int, frame: object) -> None:
        handler_saving.set()
        done.append(torchaux.save_async({"em": 1}, tmp_path / "em.pt", saver=saver).wait(WAIT_S))

    main = threading.get_ident()

    def interrupt() -> None:
        deadline = time.monotonic() + WAIT_S
        while not _in_function(main, "reserve") and time.monotonic() < deadline:
            time.sleep(0.01)  # polling where the main thread is, not timing it
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler_saving.wait(WAIT_S)
        saver._slots.release()
        sink.release()

    helper = background(interrupt)
    old = signal.signal(signal.SIGUSR1, on_signal)
    try:
        regular = torchaux.save_async(state(5), tmp_path / "reg.pt", saver=saver)
    finally:
        signal.signal(signal.SIGUSR1, old)
    helper.result(WAIT_S)
    assert done == [str(tmp_path / "em.pt")]
    assert regular.wait(WAIT_S) == str(tmp_path / "reg.pt")
    blocker.wait(WAIT_S)


def test_prepare_makes_the_first_save_use_warm_buffers(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After prepare(state), the first save takes the very buffers prepare faulted in; none are new."""
    saver = AsyncSaver()
    try:
        state = {"a": torch.randn(1 << 18), "b": torch.arange(10), "c": torch.randn(3, 3)}
        assert saver.prepare(state) == sum(t.untyped_storage().nbytes() for t in state.values())
        allocated: list[int] = []
        real = saver.pool._allocate
        monkeypatch.setattr(saver.pool, "_allocate", lambda n, p: allocated.append(n) or real(n, p))
        torchaux.save_async(state, tmp_path / "a.pt", saver=saver).wait(timeout=WAIT_S)
        assert allocated == []  # negative control below: without prepare, every buffer is new
        fresh = AsyncSaver()
        try:
            monkeypatch.setattr(fresh.pool, "_allocate", lambda n, p: allocated.append(n) or real(n, p))
            torchaux.save_async(state, tmp_path / "b.pt", saver=fresh).wait(timeout=WAIT_S)
            assert len(allocated) == 3
        finally:
            fresh.close()
        assert_identical(load(str(tmp_path / "a.pt")), state)
    finally:
        saver.close()


def test_prepare_starts_the_writer_and_refuses_a_closed_saver() -> None:
    """The first save after prepare starts no thread; a closed saver is not silently warmed."""
    saver = AsyncSaver(name="prepared-writer")
    try:
        assert not any(t.name == "prepared-writer" for t in threading.enumerate())
        saver.prepare({"w": torch.zeros(8)})
        assert any(t.name == "prepared-writer" and t.is_alive() for t in threading.enumerate())
    finally:
        saver.close()
    with pytest.raises(SaveClosedError, match="closed"):
        saver.prepare({"w": torch.zeros(8)})
