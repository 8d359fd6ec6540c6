"""Spawned-rank workers of test_sharded_s3.py: a CheckpointManager of 2 gloo ranks on S3 (moto).

The ranks reach the test process's moto server through the ``storage_options``
passed as arguments.  Model, state and comparisons: tests/distributed/dist_workers.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import manager_dist_workers as mdw
from manager_dist_workers import KEY, LOSS, dist_workers, expect_raise, gathered

import torchaux
from torchaux.errors import CheckpointError


def run(fn_name: str, world: int, *args: Any) -> None:
    """Run ``fn_name(rank, world, *args)`` of this module on ``world`` spawned ranks."""
    dist_workers.run_in(__name__, fn_name, world, *args)


def first_run(rank: int, world: int, base: str, options: dict[str, Any], root: str) -> None:
    """Save every 2 steps with retention, replace a step, encrypt, survive a failed rank."""
    model, opt = dist_workers.fsdp_model(world)
    run_url = f"{base}/run"
    mgr = torchaux.CheckpointManager(
        run_url, save_interval_steps=2, keep_latest=2, best_fn="loss", keep_best=1,
        storage_options=options,
    )
    assert mgr._sharded is not None and mgr.all_steps() == []
    handle = None
    for step in range(9):
        dist_workers.train(model, opt, step)
        sd = dist_workers.state(model, opt, world, step)
        metrics = {"loss": LOSS.get(step, 9.0) if rank == 0 else 100.0 - step}
        handle = mgr.save(step, sd, metrics=metrics)
        assert (handle is None) == (step % 2 == 1), (step, handle)
        if step == 8:
            expected = dist_workers.full(sd)
            if rank == 0:
                torch.save(expected, os.path.join(root, "expected.pt"))
    assert handle is not None and handle.wait(60) == f"{run_url}/step-8"
    mgr.wait_until_finished()
    views = gathered((mgr.all_steps(), mgr.best_step(), mgr.metrics(2)))
    assert views[0] == views[1] == ([2, 6, 8], 2, {"loss": 0.1}), views
    # Replacing step 6 (force): the new state and rank 0's new metrics count.
    sd6 = {"w": torch.full((8,), 60.0 + rank), "step": 6}
    assert mgr.save(6, sd6, metrics={"loss": 0.6}, force=True).wait(60)  # type: ignore[union-attr]
    mgr.wait_until_finished()
    assert gathered(mgr.all_steps()) == [[2, 6, 8]] * world
    out = {"w": torch.zeros(8), "step": -1}
    mgr.restore(6, state=out)
    assert out["step"] == 6 and torch.equal(out["w"], torch.full((8,), 60.0)), out  # rank 0's copy
    assert mgr.metrics(6) == {"loss": 0.6}
    mgr.close()

    # Encrypted distributed steps on S3: restored with the key only.
    enc_url = f"{base}/enc"
    enc = torchaux.CheckpointManager(enc_url, enc_key=KEY, storage_options=options)
    w = torch.full((4,), float(rank))
    assert enc.save(0, {"w": w + 1, "step": 0}).wait(60)  # type: ignore[union-attr]
    out = {"w": torch.zeros(4), "step": -1}
    enc.restore(state=out)
    assert out["step"] == 0 and torch.equal(out["w"], torch.ones(4)), out
    enc.close()
    plain = torchaux.CheckpointManager(enc_url, storage_options=options)
    assert "pass enc_key" in str(expect_raise(ValueError, plain.restore, state=out))
    plain.close()

    failing_rank(rank, world, f"{base}/fail", options)


def failing_rank(rank: int, world: int, url: str, options: dict[str, Any]) -> None:
    """Rank 1's write fails: every handle raises, the previous step stays the latest."""
    from torchaux.distributed.writer import StorageWriter

    mgr = torchaux.CheckpointManager(url, keep_latest=2, storage_options=options)
    w = torch.full((8,), float(rank))
    assert mgr.save(1, {"w": w, "step": 1}).wait(60)  # type: ignore[union-attr]
    original = StorageWriter._write_rank_file
    if rank == 1:
        def broken(self: Any, *a: Any, **k: Any) -> Any:
            raise OSError(28, "No space left on device (injected)")

        StorageWriter._write_rank_file = broken  # type: ignore[method-assign]
    try:
        handle = mgr.save(2, {"w": w + 10, "step": 2}, metrics={"loss": 1.0})
        assert handle is not None
        exc = expect_raise(CheckpointError, handle.wait, 60)
        assert "No space left" in str(exc) and "rank 1" in str(exc), (rank, exc)
    finally:
        StorageWriter._write_rank_file = original  # type: ignore[method-assign]
    mgr.wait_until_finished()
    assert gathered(mgr.latest_step()) == [1] * world
    assert mgr.save(3, {"w": w + 3, "step": 3}).wait(60)  # type: ignore[union-attr]
    assert gathered(mgr.all_steps()) == [[1, 3]] * world
    mgr.close()


def resume(rank: int, world: int, base: str, options: dict[str, Any], root: str) -> None:
    """New processes: latest_step after the restart; the newest step restored into FSDP2 shards."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    mgr = torchaux.CheckpointManager(f"{base}/run", keep_latest=2, best_fn="loss", keep_best=1,
                                     storage_options=options)
    assert gathered((mgr.latest_step(), mgr.all_steps())) == [(8, [2, 6, 8])] * world
    model, opt, sd = dist_workers.fresh_state(world)
    assert mgr.restore(state=sd) is sd
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    mdw.assert_same(torch.load(os.path.join(root, "expected.pt"), weights_only=True),
                    dist_workers.full(sd))
    exc = expect_raise(FileNotFoundError, mgr.restore, 5, state=sd)
    assert "committed: [2, 6, 8]" in str(exc), exc
    mgr.close()
