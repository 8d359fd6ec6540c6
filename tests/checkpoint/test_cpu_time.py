"""cpu_time: the CPU of torchaux's background threads is counted, the caller's is not."""

from __future__ import annotations

import pathlib
import threading

import torch

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.cpu_time import background_cpu_seconds, counted


def test_a_background_save_counts_its_writer_cpu(tmp_path: pathlib.Path) -> None:
    """A 64 MiB save adds the writer thread's CPU time (CRC and copies run there)."""
    state = {"w": torch.randn(16 << 20)}
    saver = torchaux.AsyncSaver()
    try:
        before = background_cpu_seconds()
        with _knobs.override(fsync=0):
            torchaux.save_async(state, tmp_path / "a.pt", saver=saver).wait(timeout=120)
        assert background_cpu_seconds() > before
    finally:
        saver.close()


def test_work_on_the_calling_thread_outside_counted_is_not_counted() -> None:
    """Only blocks under counted() add up; another thread's counted block adds its own CPU."""
    before = background_cpu_seconds()
    sum(range(200_000))
    assert background_cpu_seconds() == before
    done = []

    def work() -> None:
        with counted():
            sum(range(200_000))
        done.append(True)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert done and background_cpu_seconds() > before
