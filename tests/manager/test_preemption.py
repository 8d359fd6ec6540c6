"""Preemption: a watched signal makes the next save durable, then reached_preemption() is True."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.manager.preemption import PreemptionWatcher


def test_signal_forces_a_durable_save_off_the_interval(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    mgr = torchaux.CheckpointManager(tmp_path / "run", save_interval_steps=100,
                                     preemption=[signal.SIGUSR1])
    try:
        assert mgr.save(0, {"w": torch.zeros(2)}) is not None
        assert mgr.save(1, {"w": torch.ones(2)}) is None  # off the interval
        assert not mgr.reached_preemption()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr._watcher is not None and mgr._watcher.wait(10.0)
        assert not mgr.reached_preemption()  # nothing durable since the signal yet
        handle = mgr.save(2, {"w": torch.full((2,), 2.0)})
        assert handle is not None and handle.done()  # saved and waited for, off the interval
        assert mgr.reached_preemption() and mgr.latest_step() == 2
    finally:
        mgr.close()
    assert signal.getsignal(signal.SIGUSR1) is before  # the old handler is back


def test_sigterm_is_watched_by_default_and_handlers_restored(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with torchaux.CheckpointManager(tmp_path / "run", preemption=True) as mgr:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert not mgr.reached_preemption()
    assert signal.getsignal(signal.SIGTERM) is before


def test_without_preemption_no_handler_is_installed(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with torchaux.CheckpointManager(tmp_path / "run") as mgr:
        assert signal.getsignal(signal.SIGTERM) is before and not mgr.reached_preemption()


def test_preemption_only_from_the_main_thread(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def make() -> None:
        try:
            torchaux.CheckpointManager(tmp_path / "run", preemption=True)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert "main thread" in str(errors[0])
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bad_signals_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a signal"):
        torchaux.CheckpointManager(tmp_path / "run", preemption=[12345])
    with pytest.raises(ValueError, match="at least one signal"):
        PreemptionWatcher([])
    assert not (tmp_path / "run").exists()
