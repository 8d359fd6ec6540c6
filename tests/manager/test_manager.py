"""CheckpointManager: the contract, run on a local disk and on the local S3 server alike."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import torchaux
from torchaux.manager.steps import LATEST_NAME, METADATA_NAME, STATE_NAME

WAIT_S = 60.0
KEY = bytes(range(16))


class Run:
    """Where a test's manager keeps its steps, and a factory closing every manager it made."""

    def __init__(self, kind: str, directory: str, options: dict[str, Any] | None, fs: Any) -> None:
        self.kind = kind
        self.directory = directory
        self.options = options
        self.fs = fs
        self.made: list[torchaux.CheckpointManager] = []

    def manager(self, **kwargs: Any) -> torchaux.CheckpointManager:
        if self.options is not None:
            kwargs.setdefault("storage_options", self.options)
        mgr = torchaux.CheckpointManager(self.directory, **kwargs)
        self.made.append(mgr)
        return mgr

    def names(self) -> list[str]:
        """Entries directly under the run directory."""
        if self.kind == "local":
            return sorted(os.listdir(self.directory))
        self.fs.invalidate_cache()
        root = self.directory.split("://", 1)[1]
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(root, detail=False))

    def read(self, *parts: str) -> bytes:
        if self.kind == "local":
            with open(os.path.join(self.directory, *parts), "rb") as f:
                return f.read()
        self.fs.invalidate_cache()
        return self.fs.cat_file("/".join([self.directory.split("://", 1)[1], *parts]))

    def put(self, data: bytes, *parts: str) -> None:
        """Plant a file (a crashed save's leftover, a user's folder) under the run."""
        if self.kind == "local":
            path = os.path.join(self.directory, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe_file("/".join([self.directory.split("://", 1)[1], *parts]), data)


@pytest.fixture(params=["local", "s3"])
def run(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Run]:
    if request.param == "local":
        r = Run("local", str(tmp_path / "run"), None, None)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        r = Run("s3", bucket.url("run"), bucket.storage_options, bucket.fs)
    yield r
    for mgr in r.made:
        mgr.close()


def state_for(step: int) -> dict[str, Any]:
    return {"w": torch.full((4,), float(step)), "step": step, "nested": {"b": torch.arange(3) + step}}


def test_round_trip_and_resume_in_a_new_manager(run: Run) -> None:
    """Saved steps are listed, restored exactly, and a new manager resumes from the newest."""
    mgr = run.manager(keep_latest=None)
    for step in range(3):
        handle = mgr.save(step, state_for(step), metrics={"loss": 1.0 / (step + 1)})
        assert handle is not None
    assert handle.wait(WAIT_S).endswith(f"step-2/{STATE_NAME}")
    mgr.wait_until_finished()
    assert mgr.all_steps() == [0, 1, 2]
    mgr.close()
    again = run.manager()
    assert again.latest_step() == 2
    restored = again.restore()
    assert restored["step"] == 2 and torch.equal(restored["w"], torch.full((4,), 2.0))
    assert torch.equal(again.restore(1)["nested"]["b"], torch.arange(3) + 1)
    assert again.metrics(1) == {"loss": 0.5}
    assert run.read(LATEST_NAME) == b"2\n"


def test_interval_skips_and_force_saves(run: Run) -> None:
    """Steps off the interval are skipped (None); force=True saves one anyway."""
    mgr = run.manager(save_interval_steps=3, keep_latest=None)
    results = {step: mgr.save(step, state_for(step)) for step in range(7)}
    assert [s for s, h in results.items() if h is not None] == [0, 3, 6]
    mgr.save(7, state_for(7), force=True)
    mgr.save(5, state_for(5), force=True)  # not greater than the newest: force allows it
    mgr.wait_until_finished()
    assert mgr.all_steps() == [0, 3, 5, 6, 7]


def test_retention_latest_every_and_best_survive_a_restart(run: Run) -> None:
    """keep_latest, keep_every_steps and keep_best (from stored metrics) decide what stays."""
    losses = {0: 0.9, 1: 0.1, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5, 6: 0.4}
    kwargs = dict(keep_latest=2, keep_every_steps=4, best_fn="loss", keep_best=1)
    mgr = run.manager(**kwargs)
    for step in range(4):
        mgr.save(step, state_for(step), metrics={"loss": losses[step]})
    mgr.close()
    mgr = run.manager(**kwargs)  # best-N must come from the metrics stored with the steps
    for step in range(4, 7):
        mgr.save(step, state_for(step), metrics={"loss": losses[step]})
    mgr.wait_until_finished()
    # latest 2: 5, 6; every 4th: 0, 4; best by loss: 1.
    assert mgr.all_steps() == [0, 1, 4, 5, 6]
    assert mgr.best_step() == 1
    assert run.read(LATEST_NAME) == b"6\n"


def test_best_mode_max_and_a_callable(run: Run) -> None:
    mgr = run.manager(keep_latest=1, best_fn=lambda m: m["acc"] - m["loss"], best_mode="max", keep_best=1)
    for step, (acc, loss) in enumerate([(0.5, 0.1), (0.9, 0.1), (0.6, 0.2)]):
        mgr.save(step, state_for(step), metrics={"acc": acc, "loss": loss})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 2] and mgr.best_step() == 1


def test_keep_latest_one_never_deletes_the_newest_while_the_next_is_in_flight(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With keep_latest=1 the newest committed step stays until the next one commits."""
    mgr = run.manager(keep_latest=1)
    mgr.save(0, state_for(0)).wait(WAIT_S)
    mgr.save(1, state_for(1)).wait(WAIT_S)
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1]
    gate, entered = threading.Event(), threading.Event()
    commit = mgr._store.commit

    def gated(target: str, info: Any) -> Any:
        entered.set()
        assert gate.wait(WAIT_S)
        return commit(target, info)

    monkeypatch.setattr(mgr._store, "commit", gated)
    handle = mgr.save(2, state_for(2))
    assert entered.wait(WAIT_S)
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1  # in flight: not listed, 1 kept
    gate.set()
    handle.wait(WAIT_S)
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2]


def test_temp_locations_and_partial_steps_are_never_steps_and_orphans_go_at_start(run: Run) -> None:
    """Temp folders, steps without a commit marker and look-alike names are not listed."""
    mgr = run.manager()
    mgr.save(1, state_for(1)).wait(WAIT_S)
    mgr.close()
    marker = run.read("step-1", METADATA_NAME)
    run.put(b"partial", "step-9", STATE_NAME)  # a killed save: no marker
    run.put(marker, "step-01", METADATA_NAME)  # not a canonical step name
    if run.kind == "local":
        run.put(marker, ".step-7.torchaux-tmp-999999-abcd", METADATA_NAME)
    mgr = run.manager()
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    names = run.names()
    if run.kind == "s3":  # state uploaded, marker never written: a killed save's orphan
        assert "step-9" not in names
    assert not any("torchaux-tmp" in n for n in names)
    assert "step-01" in names  # not ours to delete: it was never a step


def test_latest_pointer_is_only_a_hint(run: Run) -> None:
    """A stale or damaged `latest` file changes nothing: the committed steps are the truth."""
    mgr = run.manager(keep_latest=None)
    for step in range(2):
        mgr.save(step, state_for(step))
    mgr.close()
    run.put(b"garbage", LATEST_NAME)
    mgr = run.manager()
    assert mgr.latest_step() == 1 and mgr.restore()["step"] == 1


def test_encrypted_steps_round_trip(run: Run) -> None:
    """enc_key encrypts every step; restore needs the key."""
    mgr = run.manager(enc_key=KEY)
    flat = {"w": torch.randn(8), "epoch": 3}
    mgr.save(5, flat).wait(WAIT_S)
    mgr.close()
    assert b"PK" not in run.read("step-5", STATE_NAME)[:16]
    restored = run.manager(enc_key=KEY).restore()
    assert torch.equal(restored["w"], flat["w"]) and restored["epoch"] == 3
    with pytest.raises(ValueError, match="encrypted"):
        run.manager().restore(5)


def test_restore_into_state_in_place(run: Run) -> None:
    mgr = run.manager()
    mgr.save(3, state_for(3)).wait(WAIT_S)
    live = state_for(0)
    w = live["w"]
    out = mgr.restore(state=live)
    assert out is live and live["w"] is w and torch.equal(w, torch.full((4,), 3.0))
    assert live["step"] == 3


def test_sync_mode_returns_committed(run: Run) -> None:
    mgr = run.manager(async_save=False)
    handle = mgr.save(0, state_for(0))
    assert handle is not None and handle.done() and mgr.latest_step() == 0


def test_bad_input_is_refused_before_any_work(run: Run) -> None:
    mgr = run.manager()
    mgr.save(4, state_for(4)).wait(WAIT_S)
    mgr.wait_until_finished()
    before = run.names()
    for bad, exc in [("5", TypeError), (5.0, TypeError), (True, TypeError), (-1, ValueError),
                     (4, ValueError), (3, ValueError)]:
        with pytest.raises(exc):
            mgr.save(bad, state_for(0))
    with pytest.raises(TypeError, match="metrics"):
        mgr.save(6, state_for(6), metrics={"loss": "low"})
    with pytest.raises(ValueError, match="finite"):
        mgr.save(6, state_for(6), metrics={"loss": float("nan")})
    with pytest.raises(FileNotFoundError, match="committed"):
        mgr.restore(99)
    mgr.wait_until_finished()
    assert run.names() == before and mgr.all_steps() == [4]


@pytest.mark.parametrize("kwargs, exc", [
    ({"save_interval_steps": 0}, ValueError),
    ({"keep_latest": 0}, ValueError),
    ({"keep_best": 1}, ValueError),  # no best_fn
    ({"best_mode": "lowest"}, ValueError),
    ({"best_fn": 3}, TypeError),
    ({"async_save": "yes"}, TypeError),
    ({"enc_key": b"short"}, ValueError),
    ({"preemption": "SIGTERM"}, TypeError),
    ({"no_such_option": 1}, TypeError),
])
def test_bad_options_are_refused(tmp_path: Any, kwargs: dict[str, Any], exc: type) -> None:
    with pytest.raises(exc):
        torchaux.CheckpointManager(str(tmp_path / "run"), **kwargs)
    assert os.listdir(tmp_path) == []  # nothing created


def test_unusable_directories_are_refused(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        torchaux.CheckpointManager(str(blocker))
    with pytest.raises(ValueError, match="cannot be created"):
        torchaux.CheckpointManager(str(blocker / "sub"))
    with pytest.raises(ValueError, match="storage_options only apply to URLs"):
        torchaux.CheckpointManager(str(tmp_path / "run"), storage_options={"anon": True})


def test_missing_bucket_is_refused(s3_bucket: Any) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        torchaux.CheckpointManager("s3://no-such-bucket-torchaux/run", storage_options=s3_bucket.storage_options)


def _failing_commit(mgr: torchaux.CheckpointManager, monkeypatch: pytest.MonkeyPatch) -> list[OSError]:
    raised: list[OSError] = []
    commit = mgr._store.commit

    def failing(target: str, info: Any) -> Any:
        class Boom:
            def __enter__(self) -> Any:
                self.inner = commit(target, info)
                return self.inner.__enter__()

            def __exit__(self, *exc: Any) -> bool:
                err = OSError(28, "No space left on device (injected)")
                raised.append(err)
                self.inner.__exit__(OSError, err, None)
                raise err

        return Boom()

    monkeypatch.setattr(mgr._store, "commit", failing)
    return raised


def test_a_failed_save_reaches_the_caller_and_commits_nothing(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = run.manager()
    mgr.save(0, state_for(0)).wait(WAIT_S)
    raised = _failing_commit(mgr, monkeypatch)
    handle = mgr.save(1, state_for(1))
    with pytest.raises(OSError) as info:
        handle.wait(WAIT_S)
    assert info.value is raised[0]
    monkeypatch.undo()
    mgr.wait_until_finished()  # observed through the handle: not raised again
    assert mgr.all_steps() == [0]
    assert not any("torchaux-tmp" in n for n in run.names())


def test_an_unobserved_failure_is_raised_by_the_next_save_and_by_close(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = run.manager()
    raised = _failing_commit(mgr, monkeypatch)
    mgr.save(0, state_for(0))
    with pytest.raises(OSError) as info:
        mgr.wait_until_finished()
    assert info.value is raised[0]
    mgr.save(1, state_for(1))
    with pytest.raises(OSError):
        mgr.close()


def test_a_failed_deletion_reaches_the_caller(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = run.manager(keep_latest=1)
    err = PermissionError("injected: cannot delete")

    def refuse(step: int) -> None:
        raise err

    monkeypatch.setattr(mgr._store, "delete", refuse)
    mgr.save(0, state_for(0))
    mgr.save(1, state_for(1))
    with pytest.raises(PermissionError) as info:
        mgr.wait_until_finished()
    assert info.value is err
    assert mgr.all_steps() == [0, 1]


def test_closed_manager_refuses_saves(run: Run) -> None:
    with run.manager() as mgr:
        mgr.save(0, state_for(0))
    assert mgr.latest_step() == 0
    with pytest.raises(torchaux.SaveClosedError):
        mgr.save(1, state_for(1))


def test_no_committed_step_to_restore(run: Run) -> None:
    mgr = run.manager()
    assert mgr.latest_step() is None and mgr.all_steps() == []
    with pytest.raises(FileNotFoundError, match="no committed step"):
        mgr.restore()
    with pytest.raises(ValueError, match="best_fn"):
        mgr.best_step()


