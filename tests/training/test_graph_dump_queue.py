"""save_graph_tensor off the caller's path: one copy on the caller, the rest on the dump queue."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from sinks import GatedSink, background, still_running
from torch.utils._python_dispatch import TorchDispatchMode

import torchaux
from torchaux import _knobs
from torchaux.training.graph_dump import dump as graph_dump
from torchaux.training.graph_dump import writer
from torchaux.training.graph_dump.dump import save_graph_tensor

CPU_INDEX = graph_dump._device_index(torch.device("cpu"))


@pytest.fixture
def fresh_saver(monkeypatch: pytest.MonkeyPatch) -> writer._DumpSaver:
    """A dump saver of this test only (the process-wide one is left alone)."""
    saver = writer._DumpSaver(max_pending=4, name="test-dumps")
    monkeypatch.setattr(graph_dump, "_saver", saver)
    yield saver
    saver.close(timeout=60)


def test_cpu_dump_is_pickled_and_written_off_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_saver: writer._DumpSaver
) -> None:
    """The caller never runs save_async (pickling, staging) for a CPU dump; the queue's thread does."""
    threads: list[threading.Thread] = []
    real = writer.save_async

    def recording(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "save_async", recording)
    monkeypatch.setattr(graph_dump, "save_async", recording)
    x = torch.arange(4.0)
    save_graph_tensor(x, tmp_path / "x.pt")
    x.add_(100)  # after the call: the file keeps the value at the call
    torchaux.wait_saves()
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert torch.equal(torch.load(tmp_path / f"x_device_{CPU_INDEX}.pt"), torch.arange(4.0))


def test_dumps_wait_for_a_quiet_moment_or_a_waiter(
    tmp_path: Path, fresh_saver: writer._DumpSaver
) -> None:
    """A burst is not written while it lasts (no GIL contention); wait_saves writes it at once."""
    with _knobs.override(dump_idle_ms=600_000):
        for i in range(5):
            save_graph_tensor(torch.full((3,), float(i)), tmp_path / "b.pt")
        assert os.listdir(tmp_path) == []
        torchaux.wait_saves()
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 5
    assert torch.equal(torch.load(tmp_path / names[-1]), torch.full((3,), 4.0))


def test_dump_queue_is_bounded_in_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the writer stuck, dumps beyond TORCHAUX_DUMP_QUEUE_BYTES wait; releasing it lets them go."""
    sink = GatedSink()
    saver = writer._DumpSaver(max_pending=1, sink=sink)
    monkeypatch.setattr(graph_dump, "_saver", saver)
    t = torch.zeros(256)  # 1 KiB
    try:
        with _knobs.override(dump_queue_bytes=1500, dump_idle_ms=0):
            save_graph_tensor(t, tmp_path / "q.pt")  # reaches the (blocked) writer
            assert sink.entered.wait(60)
            save_graph_tensor(t, tmp_path / "q.pt")  # staged, waits for the writer's slot
            save_graph_tensor(t, tmp_path / "q.pt")  # queued: 1 KiB of 1500 bytes
            fourth = background(save_graph_tensor, t, tmp_path / "q.pt")
            assert still_running(fourth)  # 2 KiB would exceed the bound
            sink.release()
            fourth.result(timeout=60)
            torchaux.wait_saves()
    finally:
        sink.release()
        saver.close(timeout=60)
    assert len([n for n in os.listdir(tmp_path) if n.startswith("q_")]) == 4


def test_a_failed_hand_over_reaches_wait_saves(
    tmp_path: Path, fresh_saver: writer._DumpSaver
) -> None:
    """A dump the queue cannot hand to the engine (its directory vanished) is raised, not lost."""
    d = tmp_path / "gone"
    with _knobs.override(dump_idle_ms=600_000):
        save_graph_tensor(torch.ones(2), d / "x.pt")
        os.rmdir(d)
        with pytest.raises(ValueError, match="does not exist|directory"):
            torchaux.wait_saves()
    save_graph_tensor(torch.ones(2), tmp_path / "ok.pt")  # the queue keeps working
    torchaux.wait_saves()
    assert os.path.exists(tmp_path / f"ok_device_{CPU_INDEX}.pt")


def test_eager_dumps_skip_the_operator_but_modes_still_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_saver: writer._DumpSaver
) -> None:
    """Plain eager calls run the kernel directly; under a dispatch mode the operator is called."""
    seen: list[object] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func)
            return func(*args, **(kwargs or {}))

    calls: list[int] = []
    real_op = graph_dump._OP
    monkeypatch.setattr(graph_dump, "_OP", lambda *a, **k: (calls.append(1), real_op(*a, **k)))
    save_graph_tensor(torch.ones(2), tmp_path / "e.pt")
    assert calls == []
    with Spy():
        save_graph_tensor(torch.ones(2), tmp_path / "m.pt")
    assert calls == [1] and graph_dump._OP is not real_op and real_op in seen
    torchaux.wait_saves()


def test_first_eager_dump_imports_no_compiler(tmp_path: Path) -> None:
    """The first dump does not pay torch._dynamo's import (1.2 s here, the review's g5)."""
    code = (
        "import sys, torch, torchaux\n"
        "before = 'torch._dynamo' in sys.modules\n"
        f"torchaux.save_graph_tensor(torch.ones(2), {str(tmp_path / 'f.pt')!r})\n"
        "torchaux.wait_saves()\n"
        "print(before, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert after == before  # the dump itself imported nothing of the compiler


def test_snapshots_reuse_warm_buffers(fresh_saver: writer._DumpSaver) -> None:
    """A handed-over copy is kept for the next dump of that shape (no fresh page faults)."""
    a = fresh_saver.snapshot(torch.ones(8))
    fresh_saver._keep_spare(a)
    b = fresh_saver.snapshot(torch.full((8,), 2.0))
    assert b is a and torch.equal(b, torch.full((8,), 2.0))
