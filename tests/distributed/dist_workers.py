"""Spawned-rank helpers for the torchaux.distributed tests (gloo on CPU, 127.0.0.1).

Imported by name from the test modules and by the spawned children (the
spawn start method passes ``sys.path`` on).  Each worker does several checks
per process group, so the suite pays the start-up of the ranks few times.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=120),
    )


def run(fn_name: str, world: int, *args: Any) -> None:
    """Run ``fn_name(rank, world, *args)`` on ``world`` spawned ranks; re-raise a failure."""
    run_in(__name__, fn_name, world, *args)


def _entry_in(rank: int, module: str, fn_name: str, world: int, port: int, args: tuple[Any, ...]) -> None:
    import importlib

    init(rank, world, port)
    try:
        getattr(importlib.import_module(module), fn_name)(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_in(module: str, fn_name: str, world: int, *args: Any) -> None:
    """Run ``module.fn_name(rank, world, *args)`` on ``world`` spawned ranks (other worker modules)."""
    mp.start_processes(
        _entry_in, args=(module, fn_name, world, free_port(), args), nprocs=world,
        start_method="spawn",
    )


# -- the model -------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))


def fsdp_model(world: int, device: str = "cpu",
               model: nn.Module | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``model`` (default :func:`make_model`; layers 0 and 2 sharded) under FSDP2 on ``device``, with Adam."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    model = (make_model() if model is None else model).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 12, generator=gen)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state(model: nn.Module, opt: torch.optim.Optimizer, world: int, step: int) -> dict[str, Any]:
    """FSDP2 model + optimizer, a replicated tensor (DDP-like), a column-sharded DTensor, values."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    msd, osd = get_state_dict(model, opt)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(step)
    tp = distribute_tensor(torch.randn(5, 17), mesh, [Shard(1)])
    return {"model": msd, "optim": osd, "rep": torch.arange(10.0) + step, "tp": tp,
            "step": step, "meta": {"lr": 0.01, "name": "mlp"}}


def full(obj: Any) -> Any:
    """Every DTensor replaced by its full tensor (a collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full(v) for v in obj)
    return obj


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)}"
        assert a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(map(str, a)) == set(map(str, b)), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        bb = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            assert_same(v, bb[str(k)], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def fresh_state(world: int) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A differently trained model whose state dict has the checkpoint's structure."""
    model, opt = fsdp_model(world)
    train(model, opt, step=999)
    sd = state(model, opt, world, step=-5)
    sd["step"], sd["meta"] = 0, {"lr": 0.0, "name": ""}
    return model, opt, sd


def load_and_check(world: int, directory: str, expected_path: str, **kw: Any) -> None:
    import torchaux.distributed as td
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, opt, sd = fresh_state(world)
    td.load(sd, directory, **kw)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    got = full(sd)
    expected = torch.load(expected_path, weights_only=True)
    assert_same(expected, got)


# -- workers ------------------------------------------------------------------------


def save_fsdp(rank: int, world: int, directory: str, expected_path: str) -> None:
    """save_async of FSDP2+Adam, a replicated and a TP tensor; mutate at once; load back."""
    import torchaux.distributed as td

    model, opt = fsdp_model(world)
    for step in range(2):
        train(model, opt, step)
    sd = state(model, opt, world, step=2)
    expected = full(sd)
    handle = td.save_async(sd, directory, timeout=60)
    train(model, opt, step=7)  # the snapshot was taken at the call
    with torch.no_grad():
        sd["rep"].add_(100)
    assert handle.wait(60) == os.path.abspath(directory)
    if rank == 0:
        torch.save(expected, expected_path)
    dist.barrier()
    load_and_check(world, directory, expected_path)


def overlapped_and_sharded_tensor(rank: int, world: int, root: str) -> None:
    """model=: copies overlap the next step, whose optimizer step fences; ShardedTensor refused."""
    import pytest
    from torch.distributed._shard.sharded_tensor import empty as sharded_empty
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    import torchaux.distributed as td
    from torchaux.checkpoint.engine import fence
    from torchaux.errors import InvalidArgumentError

    model, opt = fsdp_model(world)
    train(model, opt, 0)
    sd = state(model, opt, world, step=1)
    expected = full(sd)
    directory = os.path.join(root, "overlapped")
    handle = td.save_async(sd, directory, timeout=60, model=model)
    train(model, opt, step=7)  # forward, backward and the optimizer step right away
    assert handle.wait(60) == os.path.abspath(directory)
    assert fence.armed_count() == 0  # disarmed once staged
    expected_path = os.path.join(root, "expected.pt")
    if rank == 0:
        torch.save(expected, expected_path)
    dist.barrier()
    load_and_check(world, directory, expected_path)

    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    legacy = sharded_empty(spec, 4 * world, 3)
    refused = os.path.join(root, "refused")
    with pytest.raises(InvalidArgumentError, match=r"optim\.st is a legacy ShardedTensor.*DTensor.*"
                       r"torch\.distributed\.checkpoint\.save"):
        td.save_async({"w": torch.ones(2), "optim": {"st": legacy}}, refused, timeout=60)
    assert not os.path.exists(os.path.join(refused, ".metadata"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        td.save_async({"w": torch.ones(2)}, refused, model=opt)  # type: ignore[arg-type]


def load_fsdp(rank: int, world: int, directory: str, expected_path: str) -> None:
    load_and_check(world, directory, expected_path)


def interop(rank: int, world: int, root: str) -> None:
    """Stock DCP <-> torchaux both ways, dcp.async_save (thread, process) on torchaux."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    import torchaux.distributed as td

    model, opt = fsdp_model(world)
    train(model, opt, 0)
    sd = state(model, opt, world, step=1)
    expected_path = os.path.join(root, "expected.pt")
    expected = full(sd)
    if rank == 0:
        torch.save(expected, expected_path)
    dist.barrier()
    # stock writer -> torchaux reader
    stock = os.path.join(root, "stock")
    dcp.save(sd, checkpoint_id=stock)
    load_and_check(world, stock, expected_path)
    # dcp.async_save (thread) with torchaux writer + stager -> stock reader
    stager = td.Stager()
    ours = os.path.join(root, "ours")
    fut = dcp.async_save(sd, storage_writer=td.StorageWriter(ours), async_stager=stager)
    fut.result()
    model2, opt2, sd2 = fresh_state(world)
    dcp.load(sd2, checkpoint_id=ours)  # stock FileSystemReader
    got = full(sd2)
    assert_same({k: expected[k] for k in ("model", "optim", "rep", "tp")},
                {k: got[k] for k in ("model", "optim", "rep", "tp")})
    # process checkpointer type
    proc = os.path.join(root, "proc")
    fut = dcp.async_save(sd, storage_writer=td.StorageWriter(proc), async_stager=stager,
                         async_checkpointer_type=AsyncCheckpointerType.PROCESS)
    fut.result()
    load_and_check(world, proc, expected_path)
    stager.close()


def failing_rank(rank: int, world: int, directory: str) -> None:
    """A rank whose write fails: nobody commits, every rank raises naming it."""
    import torchaux.distributed as td
    from torchaux.distributed.writer import StorageWriter
    from torchaux.errors import CheckpointError

    sd = {"w": torch.full((4,), float(rank)), "step": 1}
    td.save(sd, directory, timeout=30)
    if rank == 1:
        def broken(self: Any, *a: Any, **k: Any) -> Any:
            raise OSError(28, "No space left on device (injected)")

        StorageWriter._write_rank_file = broken  # type: ignore[method-assign]
    sd2 = {"w": torch.full((4,), 10.0 + rank), "step": 2}
    try:
        td.save(sd2, directory, timeout=30)
    except CheckpointError as exc:
        assert rank == 0 or "nothing was committed" in str(exc), exc
        if rank == 0:
            assert "rank 1" in str(exc) and "No space left" in str(exc), str(exc)
    except OSError:
        assert rank == 1
    else:
        raise AssertionError("the save with a failed rank committed")
    dist.barrier()
    out = td.load_full(directory)
    assert out["step"] == 1, out


def report_exc(queue: Any, exc: BaseException, elapsed: float) -> None:
    queue.put(("err", type(exc).__name__, str(exc), elapsed, traceback.format_exc()))


# -- SIGKILL of one rank during repeated saves ----------------------------------------------

KILL_ELEMS = 1 << 16  # 256 KiB of float32 per rank: saves take a few milliseconds


def kill_state(step: int, mesh: Any) -> dict[str, Any]:
    """Every value derives from ``step``, so a torn checkpoint shows as mixed steps.

    Built with ``from_local`` (no collective): once a peer is dead, only the
    save may notice, never the test's own set-up.
    """
    from torch.distributed.tensor import DTensor, Shard

    local = torch.full((KILL_ELEMS,), float(step))
    sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return {"sharded": sharded, "replicated": torch.full((1000,), float(step)), "step": step}


def kill_loop(rank: int, world: int, port: int, directory: str, queue: Any, timeout: float) -> None:
    """Save steps 0, 1, 2, ... until a save fails; report each outcome on ``queue``."""
    import time

    import torchaux.distributed as td

    from torch.distributed.device_mesh import init_device_mesh

    init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    step = 0
    while True:
        sd = kill_state(step, mesh)
        start = time.monotonic()
        try:
            td.save(sd, directory, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report_exc(queue, exc, time.monotonic() - start)
            queue.close()
            queue.join_thread()  # flush the report before the hard exit
            os._exit(0)  # the group is broken: no destroy_process_group (it would hang)
        queue.put(("ok", rank, step))
        step += 1
