"""Spawned-rank workers for the torchaux.distributed CUDA tests (NCCL + a gloo CPU group).

One rank per GPU (NCCL cannot place two ranks on one device); the process
group is ``cpu:gloo,cuda:nccl`` as a GPU training run's, so torchaux's commit
vote and DCP's planning run on gloo while the model's collectives use NCCL.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_workers import assert_same, free_port, fsdp_model


def _entry(rank: int, fn_name: str, world: int, port: int, args: tuple[Any, ...]) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}", timeout=timedelta(seconds=120))
    try:
        globals()[fn_name](rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(fn_name: str, world: int, *args: Any) -> None:
    """Run ``fn_name(rank, world, *args)`` on ``world`` spawned CUDA ranks; re-raise a failure."""
    mp.start_processes(_entry, args=(fn_name, world, free_port(), args), nprocs=world,
                       start_method="spawn")


def _model(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    return fsdp_model(world, "cuda", nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64)))


def _train(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 256, generator=gen).cuda()
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": 3}


def _full(obj: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    return obj


def save_and_load(rank: int, world: int, root: str) -> None:
    """save_async (eager and model=) and DCP + torchaux Stager on CUDA DTensors; loads equal."""
    import torch.distributed.checkpoint as dcp

    import torchaux.distributed as td

    model, opt = _model(world)
    for step in range(2):
        _train(model, opt, step)
    for i, mode in enumerate(("eager", "model=", "dcp+stager")):
        sd = _state(model, opt)
        expected = _full(sd)
        directory = os.path.join(root, mode)
        if mode == "dcp+stager":
            stager = td.Stager()
            fut = dcp.async_save(sd, storage_writer=td.StorageWriter(directory), async_stager=stager)
            _train(model, opt, 10 + i)  # staged before async_save returned
            fut.result()
            stager.close()
        else:
            handle = td.save_async(sd, directory, model=model if mode == "model=" else None, timeout=60)
            _train(model, opt, 10 + i)  # queued at once: the snapshot was taken at the call
            handle.wait(60)
        del sd
        fresh_model, fresh_opt = _model(world)
        _train(fresh_model, fresh_opt, 99)
        target = _state(fresh_model, fresh_opt)
        target["step"] = 0
        td.load(target, directory)
        for name, t in target["model"].items():
            local = t.to_local() if hasattr(t, "to_local") else t
            assert local.device.type == "cuda", (mode, name, local.device)
        assert_same(expected, _full(target), mode)
        stock = _state(fresh_model, fresh_opt)
        dcp.load(stock, checkpoint_id=directory)  # stock DCP reads torchaux's layout on CUDA too
        assert_same(expected, _full(stock), f"{mode} (dcp.load)")
