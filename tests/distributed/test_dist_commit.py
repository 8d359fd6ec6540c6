"""The cross-rank commit: store vote, dead ranks, torn-free directories (tests src/torchaux/distributed/commit.py)."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import random
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_workers
import torchaux.distributed as td
from torchaux.distributed.commit import StoreVote
from torchaux.errors import CheckpointError


def _vote(store: dist.Store, rank: int, world: int, seconds: float) -> StoreVote:
    return StoreVote(store, "t", rank, world, list(range(10, 10 + world)), time.monotonic() + seconds)


def test_gather_names_failed_ranks_and_their_cause() -> None:
    store = dist.HashStore()
    _vote(store, 1, 3, 5).post("plan", "a")
    _vote(store, 2, 3, 5).post_failure("plan", OSError("disk on fire"))
    coord = _vote(store, 0, 3, 5)
    coord.post("plan", "z")
    with pytest.raises(CheckpointError, match=r"rank 12: OSError\('disk on fire'\)"):
        coord.gather("plan")


def test_gather_names_silent_ranks_within_the_deadline() -> None:
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=30))
    coord = _vote(store, 0, 3, 0.5)
    coord.post("plan", 1)
    _vote(store, 2, 3, 5).post("plan", 3)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"no answer from rank 11 \(dead or hung\)"):
        coord.gather("plan")
    assert time.monotonic() - start < 5


def test_receive_reports_the_coordinators_failure() -> None:
    store = dist.HashStore()
    _vote(store, 0, 2, 5).scatter_failure("outcome", CheckpointError("rank 11 failed: x"))
    with pytest.raises(CheckpointError, match="rank 11 failed: x"):
        _vote(store, 1, 2, 5).receive("outcome")


def test_receive_times_out_naming_the_coordinator() -> None:
    store = dist.HashStore()
    with pytest.raises(CheckpointError, match="no answer from rank 10"):
        _vote(store, 1, 2, 0.3).receive("outcome")


def test_one_process_save_async_snapshots_and_overwrites(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    live = {"w": torch.zeros(4), "step": 1}
    h = td.save_async(live, d)
    live["w"].add_(5)
    assert h.wait() == str(d) and h.staged.done()
    assert td.load_full(d)["w"].sum() == 0
    td.save({"w": torch.ones(4), "step": 2}, d)
    assert td.load_full(d)["step"] == 2


def test_save_async_validates_before_io(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        td.save_async([1], tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        td.save_async({}, tmp_path / "a", timeout=0)
    with pytest.raises(ValueError, match="process_group was given"):
        td.save_async({}, tmp_path / "a", process_group=object())
    assert not (tmp_path / "a").exists()


def _check_one_complete_step(directory: Path) -> int | None:
    if not (directory / ".metadata").exists():
        return None
    out = td.load_full(directory)
    step = out["step"]
    assert torch.all(out["sharded"] == step) and torch.all(out["replicated"] == step), "torn"
    assert out["sharded"].numel() == 2 * dist_workers.KILL_ELEMS
    return step


def _kill_run(tmp_path: Path, seed: int, timeout: float = 4.0) -> None:
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    directory = tmp_path / f"run{seed}"
    port = dist_workers.free_port()
    procs = [ctx.Process(target=dist_workers.kill_loop, args=(r, 2, port, str(directory), reports, timeout))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        oks: dict[int, int] = {}
        deadline = time.monotonic() + 90
        while len(oks) < 2:  # both ranks committed at least once: then the kill
            kind, *rest = reports.get(timeout=max(1, deadline - time.monotonic()))
            assert kind == "ok", rest
            oks[rest[0]] = rest[1]
        time.sleep(rng.uniform(0.0, 0.3))
        victim = rng.randrange(2)
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while True:
            kind, *rest = reports.get(timeout=timeout + 20)
            if kind == "err":
                name, message, elapsed, trace = rest
                break
        assert name == "CheckpointError", trace
        assert f"rank {victim}" in message or "unreachable" in message, message
        assert elapsed <= timeout + 2.0, (elapsed, message)
        assert time.monotonic() - killed_at <= timeout + 20
        procs[1 - victim].join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    assert _check_one_complete_step(directory) is not None
    assert not [n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".tmp")]


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_of_a_rank_never_tears_and_survivors_raise(tmp_path: Path, seed: int) -> None:
    _kill_run(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", range(100, 100 + int(os.environ.get("TORCHAUX_TEST_DIST_KILLS", "20"))))
def test_sigkill_20_seeded_runs(tmp_path: Path, seed: int) -> None:
    """20 seeded kills (issue #9's bar); ``TORCHAUX_TEST_DIST_KILLS=100`` for issue #13's count."""
    _kill_run(tmp_path, seed)
