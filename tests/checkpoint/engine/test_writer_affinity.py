"""The saver can pin its writer thread away from the training thread's cores."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.checkpoint.engine.saver import AsyncSaver

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs per-thread affinity and at least 2 usable cores",
)


def _writer_mask(saver: AsyncSaver) -> set[int]:
    thread = saver._thread
    assert thread is not None and thread.native_id is not None
    return set(os.sched_getaffinity(thread.native_id))


def test_writer_cores_pin_only_the_writer_thread(tmp_path: Path) -> None:
    """writer_cores binds the writer thread; the calling thread's mask is unchanged."""
    cores = sorted(os.sched_getaffinity(0))
    before = set(os.sched_getaffinity(threading.get_native_id()))
    saver = AsyncSaver(writer_cores=[cores[-1], cores[-1]])
    try:
        torchaux.save_async(torch.ones(4), tmp_path / "a.pt", saver=saver).wait()
        assert _writer_mask(saver) == {cores[-1]}
        assert set(os.sched_getaffinity(threading.get_native_id())) == before
    finally:
        saver.close()


def test_spare_pins_the_writer_to_cores_the_trainer_does_not_use(tmp_path: Path) -> None:
    """writer_cores='spare' pins the writer to the cores the constructing thread is not bound to."""
    cores = sorted(os.sched_getaffinity(0))
    result: dict[str, set[int]] = {}

    def trainer() -> None:
        with torchaux.thread_affinity([cores[0], cores[0]]):
            saver = AsyncSaver(writer_cores="spare")
            try:
                torchaux.save_async(torch.ones(4), tmp_path / "b.pt", saver=saver).wait()
                result["writer"] = _writer_mask(saver)
            finally:
                saver.close()

    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    assert result["writer"] == set(cores[1:])


def test_bad_writer_cores_fail_at_construction() -> None:
    """An invalid core range raises ValueError when the saver is built, not later on its thread."""
    with pytest.raises(ValueError, match="core range"):
        AsyncSaver(writer_cores=[3, 1])
    with pytest.raises(ValueError, match="spare"):
        AsyncSaver(writer_cores="all")  # type: ignore[arg-type]
