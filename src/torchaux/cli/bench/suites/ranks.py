"""What each spawned rank of ``torchaux bench --distributed`` runs (gloo on CPU, 127.0.0.1).

With ``job["device"] == "cuda"`` the model trains on the rank's GPU with
NCCL (``cpu:gloo,cuda:nccl``: DCP's and torchaux's CPU-side collectives use
gloo), and each step ends by synchronizing the current stream, so that a
window's seconds include its kernels (as a loop that reads its loss does)
but not a checkpointer's side-stream copies that overlap them.

One job per process group, so every method starts from a fresh process
(peak RSS is its own): build an FSDP2 ``fully_shard`` MLP with Adam, train
one step (Adam's state exists), then for a save method

1. one warm-up save, waited (pools, DCP's checkpoint process), untimed;
2. a no-save loop that fingerprints the state at each save step (its peak
   RSS is the training's own), then the timed loop, both from the same
   initial state with the same data, so the runs are identical step for
   step; the timed loop alternates windows of ``every`` steps that start
   with a save with windows that do not (:func:`_loop`);
3. every checkpoint loaded back and compared with its step's fingerprint.

A load job times ``dcp.load`` against ``torchaux.distributed.load`` on
checkpoints of the save jobs, alternating, at any world size (1: resharded).
Each rank writes its figures as JSON into the job's result folder.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchaux.checkpoint.engine.saver import SaveHandle
from torchaux.checkpoint.engine.staging import fence_blocked_seconds
from torchaux.cli.bench.measure import RssSampler, fingerprint

__all__ = ["METHODS", "rank_main", "width_for"]

#: The save methods, in table order.
METHODS = (
    "dcp.save",
    "dcp.async_save thread",
    "dcp.async_save process",
    "torchaux save_async",
    "dcp.async_save + torchaux writer/stager",
)
_LAYERS = 4


def width_for(size_mib: int, world: int) -> int:
    """Width of the square layers whose parameters + Adam moments total ``size_mib``.

    Each parameter is 12 bytes of state (fp32 weight, exp_avg, exp_avg_sq).

    >>> width_for(256, 2)
    2352
    """
    params = size_mib * 2**20 / 12 / _LAYERS
    step = 8 * world  # FSDP2 shards dim 0 evenly
    return max(step, int(math.sqrt(params)) // step * step)


def _build(width: int, world: int, device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(_LAYERS)]).to(device)
    mesh = init_device_mesh(device, (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def _forward_backward(model: nn.Module, width: int, rank: int, step: int,
                      device: str = "cpu") -> None:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, width, generator=gen).to(device)
    model(x).square().mean().backward()


def _locals(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the training state, as this rank's local tensor (aliasing the live one)."""
    out = []
    for p in model.parameters():
        out.append(p.to_local() if hasattr(p, "to_local") else p)
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):
                out.append(v.to_local() if hasattr(v, "to_local") else v)
    return out


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


# torch 2.11.0's DefaultStager closes its StateDictStager at the end of every
# staging, so a second async_save with the same stager fails with
# "KeyError: <class 'type'>" (pytorch#183413, a regression of pytorch PR
# #170431; seen in this bench on an H200 with torch 2.11; 2.13 reuses it).
_DEFAULT_STAGER_REUSABLE = _torch_version() != (2, 11)


def _default_stager() -> Any:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    # Pinned (ignored without CUDA) and shared memory, staged on a thread;
    # a non-blocking copy needs an accelerator (staging.py).
    return DefaultStager(StagingOptions(True, True, True, False))


class _Saves:
    """One method's save calls; ``fence()`` runs before each optimizer step."""

    def __init__(self, method: str, model: nn.Module, group: Any) -> None:
        import torch.distributed.checkpoint as dcp

        self.method, self.model, self.group, self.dcp = method, model, group, dcp
        self.pending: list[Any] = []  # futures or handles not yet durable
        self.staging: Any = None  # DCP's staging future (process mode)
        self.stager: Any = None
        self.durable: dict[str, float] = {}  # path -> seconds from the call until durable
        self.stalls: list[float] = []  # seconds in the call, plus a fence's wait for its staging
        self.calls: list[float] = []  # seconds in the call alone
        if method == "dcp.async_save process":
            self.stager = _default_stager()
        elif method.endswith("torchaux writer/stager"):
            import torchaux.distributed as td

            self.stager = td.Stager()

    def _done_at(self, path: str, start: float) -> Callable[[Any], None]:
        def done(_f: Any) -> None:
            self.durable[path] = time.perf_counter() - start

        return done

    def save(self, state: dict[str, Any], path: str) -> None:
        start = time.perf_counter()
        self._save(state, path, start)
        self.stalls.append(time.perf_counter() - start)
        self.calls.append(self.stalls[-1])

    def _save(self, state: dict[str, Any], path: str, start: float) -> None:
        import torchaux.distributed as td

        dcp = self.dcp
        if self.method == "dcp.save":
            dcp.save(state, checkpoint_id=path)
            self.durable[path] = time.perf_counter() - start
            return
        if self.method == "torchaux save_async":
            handle = td.save_async(state, path, model=self.model)  # copies overlap the next step
            handle.committed.add_done_callback(self._done_at(path, start))
            self.pending.append(handle)
            return
        for fut in self.pending:  # DCP: one save in flight (the next waits for it)
            fut.result()
        self.pending = []
        if self.method == "dcp.async_save thread":
            fut = dcp.async_save(state, checkpoint_id=path, process_group=self.group)
        elif self.method == "dcp.async_save process":
            if not _DEFAULT_STAGER_REUSABLE:  # a fresh stager per save: 2.11's workaround
                self.stager.close()
                self.stager = _default_stager()
            resp = dcp.async_save(
                state, checkpoint_id=path, async_stager=self.stager,
                async_checkpointer_type=dcp.state_dict_saver.AsyncCheckpointerType.PROCESS,
            )
            self.staging, fut = resp.staging_completion, resp.upload_completion
        else:
            fut = dcp.async_save(state, storage_writer=td.StorageWriter(path),
                                 async_stager=self.stager, process_group=self.group)
        fut.add_done_callback(self._done_at(path, start))
        self.pending.append(fut)

    def fence(self) -> None:
        if self.staging is not None:  # the live tensors may change only once staged
            start = time.perf_counter()
            self.staging.result()
            self.staging = None
            self.stalls[-1] += time.perf_counter() - start

    def wait_all(self) -> None:
        for p in self.pending:
            p.wait() if isinstance(p, SaveHandle) else p.result()
        self.pending = []


def _loop(model: nn.Module, opt: torch.optim.Optimizer, init: list[torch.Tensor], job: dict[str, Any],
          rank: int, saves: _Saves | None, prints: dict[int, Any] | None) -> list[float]:
    """``steps`` training steps from the initial state, in windows of ``every`` steps.

    With ``saves``, even windows start with a save and odd ones do not, so
    each save window has a no-save window next to it (machine load drifts
    far less within two windows than between two loops).  With ``prints``,
    the state at each save step is fingerprinted, off the clock.
    Returns each window's seconds.
    """
    with torch.no_grad():
        for live, first in zip(_locals(model, opt), init):
            live.copy_(first)
    dist.barrier()
    width, steps, every = job["width"], job["steps"], job["every"]
    device = job.get("device", "cpu")
    windows = [0.0] * (steps // every)
    for step in range(steps):
        window = step // every
        if window >= len(windows):
            break
        start = time.perf_counter()
        blocked = fence_blocked_seconds()
        _forward_backward(model, width, rank, step + 1, device)
        if saves is not None:
            saves.fence()
        opt.step()
        opt.zero_grad()
        if device == "cuda":  # the step's kernels (not side-stream copies), as loss.item() would
            torch.cuda.current_stream().synchronize()
        if saves is not None and saves.stalls:
            # torchaux's model= fences wherever they wait (forward, gradient
            # hooks, the optimizer step): each wait is the last save's stall.
            saves.stalls[-1] += fence_blocked_seconds() - blocked
        if step % every == 0 and window % 2 == 0:
            if saves is not None:
                state = _state(model, opt)
                saves.save(state, os.path.join(job["dir"], f"step_{step + 1}"))
                del state
            elif prints is not None:
                windows[window] += time.perf_counter() - start
                prints[step + 1] = fingerprint(_state(model, opt))
                dist.barrier()
                continue
        windows[window] += time.perf_counter() - start
    return windows


def _verify(method: str, model: nn.Module, opt: torch.optim.Optimizer, root: str,
            prints: dict[int, Any]) -> int:
    import torch.distributed.checkpoint as dcp

    import torchaux.distributed as td

    good = 0
    for step, expected in sorted(prints.items()):
        state = _state(model, opt)
        path = os.path.join(root, f"step_{step}")
        if "torchaux" in method:
            td.load(state, path)
        else:
            dcp.load(state, checkpoint_id=path)
        good += fingerprint(state) == expected
    return good


def _save_job(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any]:
    width, method, device = job["width"], job["method"], job.get("device", "cpu")
    model, opt = _build(width, world, device)
    _forward_backward(model, width, rank, 0, device)
    opt.step()
    opt.zero_grad()
    init = [t.clone() for t in _locals(model, opt)]
    shard = sum(t.nbytes for t in init)
    group = dist.new_group(backend="gloo")  # DCP's background collectives: a group of their own
    prints: dict[int, Any] = {}
    with RssSampler() as plain:  # the training's own peak, without checkpoints
        _loop(model, opt, init, job, rank, None, prints)
    saves = _Saves(method, model, group)
    with RssSampler() as rss:
        saves.save(_state(model, opt), os.path.join(job["dir"], "warmup"))
        saves.fence()
        saves.wait_all()
        saves.stalls.clear()
        saves.calls.clear()
        windows = _loop(model, opt, init, job, rank, saves, None)
        saves.wait_all()
    complete = _verify(method, model, opt, job["dir"], prints)
    if saves.stager is not None:
        saves.stager.close()
    return {
        "method": method, "rank": rank, "shard_bytes": shard, "rss_base": plain.peak,
        "malloc_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "rss_peak": rss.peak, "save_windows": windows[0::2], "plain_windows": windows[1::2],
        "stalls": saves.stalls, "calls": saves.calls, "saves": len(saves.stalls), "complete": complete,
        "durable": [v for k, v in saves.durable.items() if not k.endswith("warmup")],
    }


def _load_job(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import torchaux.distributed as td

    device = job.get("device", "cpu")
    model, opt = _build(job["width"], world, device)
    _forward_backward(model, job["width"], rank, 0, device)
    opt.step()
    state = _state(model, opt)
    times: dict[str, list[float]] = {"dcp.load": [], "torchaux load": []}
    for _ in range(job["repeats"]):
        for name in times:
            dist.barrier()
            start = time.perf_counter()
            if name == "dcp.load":
                dcp.load(state, checkpoint_id=job["dcp_dir"])
            else:
                td.load(state, job["torchaux_dir"])
            if device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {"rank": rank, "world": world, "load_s": {k: statistics.median(v) for k, v in times.items()}}


def rank_main(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """Entry point of one spawned rank: run ``job`` and write ``<out>/<rank>.json``."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # DCP's checkpoint process finds its store here
    # DCP's checkpoint process logs every request at INFO to stderr (logger.py
    # _init_logger); the rank's stderr, inherited by it, goes to a log file.
    # A rank's failure still reaches the parent as the spawn's exception.
    log = os.open(os.path.join(job["out"], f"{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    os.close(log)
    torch.set_num_threads(1)
    backend = "gloo"
    if job.get("device") == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}", timeout=timedelta(seconds=600))
    try:
        result = (_load_job if job["kind"] == "load" else _save_job)(rank, world, job)
        with open(os.path.join(job["out"], f"{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
