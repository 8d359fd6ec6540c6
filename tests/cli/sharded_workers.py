"""Distributed checkpoints for the ``torchaux inspect DIR`` / ``verify DIR`` tests.

Two spawned gloo ranks (CPU) save an FSDP2 model + Adam, a column-sharded
DTensor and values with ``torchaux.distributed.save`` (plaintext and
AES-GCM) and with stock ``dcp.save``.  :func:`checkpoints` spawns them once
per test session and caches the directories; tests copy a directory before
damaging it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import dist_workers  # noqa: E402 - the shared spawned-rank helpers

#: The key of the encrypted checkpoint.
KEY = bytes(range(32))
WORLD = 2

_cache: dict[str, Path] = {}


def _save_all(rank: int, world: int, root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import torchaux.distributed as td

    model, opt = dist_workers.fsdp_model(world)
    dist_workers.train(model, opt, 0)
    sd = dist_workers.state(model, opt, world, step=3)
    mesh = init_device_mesh("cpu", (world,))
    sd["rows"] = distribute_tensor(torch.arange(36.0).reshape(9, 4), mesh, [Shard(0)])  # uneven
    expected = dist_workers.full(sd)
    td.save(sd, os.path.join(root, "plain"), timeout=60)
    td.save(sd, os.path.join(root, "encrypted"), enc_key=KEY, timeout=60)
    dcp.save(sd, checkpoint_id=os.path.join(root, "stock"))
    if rank == 0:
        torch.save(expected, os.path.join(root, "expected.pt"))


def _entry(rank: int, world: int, port: int, root: str) -> None:
    dist_workers.init(rank, world, port)
    try:
        _save_all(rank, world, root)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def checkpoints(factory: Any) -> Path:
    """The root holding ``plain/``, ``encrypted/``, ``stock/`` and ``expected.pt`` (made once)."""
    if "root" not in _cache:
        root = factory.mktemp("sharded")
        mp.start_processes(_entry, args=(WORLD, dist_workers.free_port(), str(root)),
                           nprocs=WORLD, start_method="spawn")
        _cache["root"] = root
    return _cache["root"]


def data_files(directory: Path) -> list[Path]:
    """The ``.distcp`` files, by name."""
    return sorted(directory.glob("*.distcp"))


def flip_byte(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at ``offset``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))
