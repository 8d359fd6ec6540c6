"""Spawned-rank workers of test_sharded.py: a CheckpointManager on 2 gloo ranks (FSDP2 on a CPU mesh).

Imported by name from the test module and by the spawned children (the spawn
start method passes ``sys.path`` on).  The FSDP2 model, its state dict and
the comparison helpers are tests/distributed/dist_workers.py's.  Run as a
script it is one rank of a training run that test_sharded.py SIGKILLs:

    python manager_dist_workers.py train RANK WORLD PORT DIRECTORY
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import dist_workers  # noqa: E402
from dist_workers import assert_same, fsdp_model, full, train  # noqa: E402,F401

import torchaux  # noqa: E402
from torchaux.errors import CheckpointError  # noqa: E402

#: Rank 0's loss per saved step: step 2 is the best, so keep_best=1 keeps it.
LOSS = {0: 1.0, 2: 0.1, 4: 0.5, 6: 0.4, 8: 0.3}
KEY = bytes(range(32))
#: Elements of the kill run's sharded tensor: 4 MiB of float32, so a save takes a while.
KILL_NUMEL = 1 << 20


def run(fn_name: str, world: int, *args: Any) -> None:
    """Run ``fn_name(rank, world, *args)`` of this module on ``world`` spawned ranks."""
    dist_workers.run_in(__name__, fn_name, world, *args)


def gathered(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def expect_raise(kind: type[BaseException], fn: Any, *args: Any, **kwargs: Any) -> BaseException:
    try:
        fn(*args, **kwargs)
    except kind as exc:
        return exc
    raise AssertionError(f"{fn} did not raise {kind.__name__} on rank {dist.get_rank()}")


def train_and_check(rank: int, world: int, root: str) -> None:
    """Save every 2 steps with keep_latest=2 + best 1; rank 0's metrics count; same view everywhere."""
    model, opt = fsdp_model(world)
    mgr = torchaux.CheckpointManager(
        os.path.join(root, "run"), save_interval_steps=2, keep_latest=2, best_fn="loss",
        keep_best=1,
    )
    assert mgr._sharded is not None  # a process group of 2: distributed steps by default
    for step in range(9):
        train(model, opt, step)
        sd = dist_workers.state(model, opt, world, step)
        # Rank 1's metrics differ (would make step 8 the best): only rank 0's are kept.
        metrics = {"loss": LOSS.get(step, 9.0) if rank == 0 else 100.0 - step}
        handle = mgr.save(step, sd, metrics=metrics)
        assert (handle is None) == (step % 2 == 1), (step, handle)
        if step == 8:
            expected = full(sd)  # a collective: every rank
            if rank == 0:
                torch.save(expected, os.path.join(root, "expected.pt"))
    assert handle is not None and handle.wait(60) == os.path.join(mgr.directory, "step-8")
    assert mgr.latest_step() == 8  # listed once the handle resolved, on every rank
    mgr.wait_until_finished()  # rank 0's retention reached every rank
    views = gathered((mgr.all_steps(), mgr.best_step(), mgr.metrics(2)))
    assert views[0] == views[1] == ([2, 6, 8], 2, {"loss": 0.1}), views
    mgr.close()


def agreement(rank: int, world: int, root: str) -> None:
    """A signal, force or a bad argument on one rank is acted on by every rank."""
    mgr = torchaux.CheckpointManager(
        os.path.join(root, "pre"), save_interval_steps=100, preemption=[signal.SIGUSR1]
    )
    w = torch.full((4,), float(rank))
    assert mgr.save(0, {"w": w}) is not None
    assert mgr.save(1, {"w": w}) is None  # off the interval, on every rank
    if rank == 1:  # the scheduler's notice reaches one rank only
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr._watcher is not None and mgr._watcher.wait(10.0)
    dist.barrier()
    handle = mgr.save(2, {"w": w})  # off the interval: saved, and durable, on both ranks
    assert handle is not None and handle.done() and mgr.reached_preemption(), rank
    handle = mgr.save(3, {"w": w}, force=rank == 0)  # force on rank 0 only: both save
    assert handle is not None and handle.wait(60)
    exc = expect_raise(ValueError, mgr.save, 10 + rank, {"w": w})  # different steps
    assert "different steps" in str(exc), exc
    kind = TypeError if rank == 1 else ValueError  # rank 1's own error; rank 0 hears of it
    exc = expect_raise(kind, mgr.save, 4, {"w": w}, metrics={"loss": "bad"} if rank else None)
    assert rank == 1 or "refused on another rank" in str(exc), exc
    assert gathered(mgr.all_steps()) == [[0, 2, 3]] * world
    mgr.close()
    # A device-only group (NCCL, faked): the manager agrees on a gloo group of its own.
    c10d = dist.distributed_c10d
    real = c10d._get_object_coll_device
    c10d._get_object_coll_device = lambda group=None: "cuda"  # type: ignore[assignment]
    try:
        dev = torchaux.CheckpointManager(os.path.join(root, "dev"))
    finally:
        c10d._get_object_coll_device = real
    assert dev._sharded is not None and dev._sharded.group._host_pg is not None
    assert dev.save(0, {"w": w}).wait(60) and dev.save(1, {"w": w}, force=rank == 1).wait(60)  # type: ignore[union-attr]
    assert gathered(dev.all_steps()) == [[0, 1]] * world
    dev.close()
    # Encrypted distributed steps: every chunk sealed, restored with the key only.
    enc = torchaux.CheckpointManager(os.path.join(root, "enc"), enc_key=KEY)
    assert enc.save(0, {"w": w + 1, "step": 0}).wait(60)  # type: ignore[union-attr]
    out = {"w": torch.zeros(4), "step": -1}
    enc.restore(state=out)
    assert out["step"] == 0 and torch.equal(out["w"], torch.ones(4)), out  # rank 0's copy
    enc.close()
    plain = torchaux.CheckpointManager(os.path.join(root, "enc"))
    assert "pass enc_key" in str(expect_raise(ValueError, plain.restore, state=out))
    plain.close()


def failing_rank(rank: int, world: int, root: str) -> None:
    """Rank 1's write fails: every rank's handle raises, the previous step stays latest."""
    from torchaux.distributed.writer import StorageWriter

    directory = os.path.join(root, "fail")
    mgr = torchaux.CheckpointManager(directory, keep_latest=2)
    w = torch.full((8,), float(rank))
    assert mgr.save(1, {"w": w, "step": 1}).wait(60)  # type: ignore[union-attr]
    original = StorageWriter._write_rank_file
    if rank == 1:
        def broken(self: Any, *a: Any, **k: Any) -> Any:
            raise OSError(28, "No space left on device (injected)")

        StorageWriter._write_rank_file = broken  # type: ignore[method-assign]
    handle = mgr.save(2, {"w": w + 10, "step": 2}, metrics={"loss": 1.0})
    assert handle is not None
    exc = expect_raise(CheckpointError, handle.wait, 60)
    assert "No space left" in str(exc) and "rank 1" in str(exc), (rank, exc)
    mgr.wait_until_finished()  # the failure was seen through the handle: not raised again
    assert gathered(mgr.latest_step()) == [1] * world
    if rank == 0:
        assert sorted(os.listdir(directory)) == ["latest", "step-1"], os.listdir(directory)
    # An unobserved failure is raised by the next save() on every rank, even off the interval.
    handle = mgr.save(3, {"w": w, "step": 3})
    assert handle is not None
    if rank == 0:  # known on rank 0 (peeked, not observed); rank 1 may not know yet
        assert handle.committed.exception(60) is not None
    exc = expect_raise(CheckpointError, mgr.save, 4, {"w": w, "step": 4})
    assert "No space left" in str(exc), (rank, exc)
    StorageWriter._write_rank_file = original  # type: ignore[method-assign]
    assert mgr.save(5, {"w": w + 5, "step": 5}).wait(60)  # type: ignore[union-attr]
    assert gathered(mgr.all_steps()) == [[1, 5]] * world
    out = {"w": torch.zeros(8), "step": 0}
    mgr.restore(state=out)
    assert out["step"] == 5 and torch.equal(out["w"], torch.full((8,), 5.0)), out  # rank 0's shard
    mgr.close()


def first_run(rank: int, world: int, root: str) -> None:
    train_and_check(rank, world, root)
    agreement(rank, world, root)
    failing_rank(rank, world, root)


def resume(rank: int, world: int, root: str) -> None:
    """New processes: the newest complete step, restored in place, equals what was saved."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = os.path.join(root, "run")
    mgr = torchaux.CheckpointManager(directory, keep_latest=2, best_fn="loss", keep_best=1)
    assert gathered(mgr.all_steps()) == [[2, 6, 8]] * world
    model, opt, sd = dist_workers.fresh_state(world)
    assert mgr.restore(state=sd) is sd
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert_same(torch.load(os.path.join(root, "expected.pt"), weights_only=True), full(sd))
    exc = expect_raise(FileNotFoundError, mgr.restore, 5, state=sd)
    assert "committed: [2, 6, 8]" in str(exc), exc
    mgr.close()


# -- the SIGKILL run ------------------------------------------------------------------


def kill_state(step: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.full((KILL_NUMEL,), float(step)), mesh, [Shard(0)])
    return {"w": w, "rep": torch.arange(16.0) + step, "step": step}


def kill_check(rank: int, world: int, directory: str, last_seen: int) -> None:
    """After the SIGKILL: a new run resumes from a complete step, never older than the last seen."""
    mgr = torchaux.CheckpointManager(directory, keep_latest=2)
    latest = mgr.latest_step()
    assert latest is not None and latest in (last_seen, last_seen + 1), (latest, last_seen)
    assert gathered(mgr.all_steps()) == [mgr.all_steps()] * world
    sd = kill_state(-1, world)
    mgr.restore(state=sd)
    expected = kill_state(latest, world)
    assert sd["step"] == latest and torch.equal(sd["rep"], expected["rep"])
    assert torch.equal(sd["w"].to_local(), expected["w"].to_local())
    mgr.close()
    if rank == 0:
        names = sorted(os.listdir(directory))
        assert all(n == "latest" or n.startswith("step-") for n in names), names  # orphans gone


def kill_train(rank: int, world: int, port: int, directory: str) -> None:
    """Save every step until SIGKILLed; rank 0 prints each step once its handle resolved."""
    dist_workers.init(rank, world, port)
    mgr = torchaux.CheckpointManager(directory, keep_latest=2)
    start = (mgr.latest_step() or 0) + 1
    for step in range(start, start + 10_000):
        handle = mgr.save(step, kill_state(step, world))
        assert handle is not None
        handle.wait()
        if rank == 0:
            print(f"committed {step}", flush=True)


if __name__ == "__main__":
    mode, rank_s, world_s, port_s, directory_arg = sys.argv[1:6]
    assert mode == "train", mode
    kill_train(int(rank_s), int(world_s), int(port_s), directory_arg)


def coordinator_staging_failure(rank: int, world: int, root: str) -> None:
    """Rank 0's staging fails: every rank raises at once, and the next save succeeds at once.

    Before the fix rank 0's failure was posted where only rank 0 reads, so rank 1
    waited for the distributed timeout and the next save timed out on both ranks.
    """
    import time

    import torchaux
    import torchaux.distributed.api as api

    mgr = torchaux.CheckpointManager(os.path.join(root, "r"))
    assert mgr.save(0, {"w": torch.zeros(2)}).wait(60)
    real = api.stage_snapshot
    if rank == 0:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise MemoryError("injected staging failure")
        api.stage_snapshot = broken  # type: ignore[assignment]
    start = time.monotonic()
    try:
        expect_raise(BaseException, lambda: mgr.save(1, {"w": torch.ones(2)}).wait(60))
    finally:
        api.stage_snapshot = real  # type: ignore[assignment]
    assert mgr.save(2, {"w": torch.ones(2)}).wait(60)
    # TORCHAUX_DISTRIBUTED_TIMEOUT_S is 60 in the test: far below it means nobody waited it out.
    assert time.monotonic() - start < 30, time.monotonic() - start
    mgr.wait_until_finished()
    assert mgr.all_steps() == [0, 2]
    mgr.close()
