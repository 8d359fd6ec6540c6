"""``save_checkpoint(..., integrated_save=...)`` for states holding DTensors.

MindSpore's ``integrated_save`` (mindspore-spec.md §1.4; seed 003): whether a
parallel run's split tensors are merged before saving.  The PyTorch
analogue of a split tensor is a ``DTensor`` (FSDP2 ``fully_shard``, tensor
parallel), which exists only inside a process group (its device mesh):

* ``integrated_save=True`` - every DTensor is gathered with
  ``DTensor.full_tensor()`` (a collective: every rank of the mesh calls
  ``save_checkpoint``, entries in the same order), and only the mesh's lowest
  rank (rank 0 of a world mesh) writes one ordinary file - ``torch.load`` /
  safetensors readable, with every ``save_checkpoint`` feature.  The other
  ranks drop each gathered tensor at once (peak: one full tensor), write
  nothing, and their handles resolve when the writer has committed, or raise
  a :class:`~torchaux.errors.CheckpointError` carrying the writer's error.
  MindSpore has every rank write the full file; one writer avoids N copies
  of the same bytes racing for one path.
* ``integrated_save=False`` - every DTensor is replaced by its local shard
  (``to_local()``) and each rank writes its own file to the name it passes,
  as MindSpore writes local slices.  No coordination.

The writer's outcome reaches the other ranks through the process group's
key-value store, with a deadline (``TORCHAUX_DISTRIBUTED_TIMEOUT_S``, the
timeout of :mod:`torchaux.distributed`), never through a collective that a
dead or failed writer would leave hanging: the writer posts its committed
path or its error once the write ends (from the handle's done-callback, so
``async_save`` works too), and a rank whose writer died raises when the store
becomes unreachable or the deadline passes.

States without DTensors are not touched, whatever ``integrated_save`` says
(and whether or not a process group exists): a plain tensor is saved as given
by the rank that calls.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from torchaux import _knobs
from torchaux.checkpoint.engine.saver import SaveHandle
from torchaux.errors import CheckpointError

__all__ = ["has_dtensors", "local_shards", "Integrated", "gather", "target_of"]

_sequence: dict[tuple[int, ...], int] = {}
_sequence_lock = threading.Lock()


def _dtensor_type() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor was imported, so
    # a state of plain tensors never pays for importing it.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def has_dtensors(named: Mapping[str, Any]) -> bool:
    """Whether any value is a DTensor.

    >>> has_dtensors({"w": torch.zeros(2), "step": 1})
    False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(v, dtensor) for v in named.values())


def local_shards(named: Mapping[str, Any]) -> dict[str, Any]:
    """``integrated_save=False``: every DTensor replaced by this rank's local shard."""
    dtensor = _dtensor_type()
    return {k: v.to_local().detach() if dtensor is not None and isinstance(v, dtensor) else v
            for k, v in named.items()}


def _mesh_ranks(named: Mapping[str, Any]) -> list[int]:
    dtensor = _dtensor_type()
    found: dict[tuple[int, ...], str] = {}
    for name, v in named.items():
        if dtensor is not None and isinstance(v, dtensor):
            ranks = tuple(sorted(int(r) for r in v.device_mesh.mesh.flatten().tolist()))
            found.setdefault(ranks, name)
    if len(found) > 1:
        shown = "; ".join(f"{name!r} on ranks {list(r)}" for r, name in found.items())
        raise ValueError(
            "save_checkpoint(integrated_save=True) needs every DTensor on meshes of the same "
            f"ranks (one writer for one group); found {shown}. Save each group's entries with "
            "their own call (choice_func=), or use integrated_save=False"
        )
    return list(next(iter(found)))


class Integrated:
    """One integrated save's coordination: who writes, and the writer's outcome on the store."""

    def __init__(self, ranks: list[int]) -> None:
        import torch.distributed as dist

        from torchaux.distributed.commit import StoreVote

        if not dist.is_initialized():  # a DTensor without a process group: cannot happen
            raise RuntimeError("save_checkpoint got DTensors but torch.distributed is not initialised")
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(f"rank {me} holds DTensors of a mesh of ranks {ranks} it is not in")
        with _sequence_lock:  # every rank of the mesh saves in the same order
            n = _sequence.get(tuple(ranks), 0)
            _sequence[tuple(ranks)] = n + 1
        key = "-".join(map(str, ranks)) if len(ranks) <= 16 else f"{ranks[0]}..{ranks[-1]}x{len(ranks)}"
        self.ranks = ranks
        self.writer = ranks[0]
        self.is_writer = me == self.writer
        self.timeout = float(_knobs.distributed_timeout_s())
        store = dist.distributed_c10d._get_default_store()
        self.vote = StoreVote(store, f"torchaux/integrated/{key}/{n}", ranks.index(me),
                              len(ranks), ranks, time.monotonic() + self.timeout)

    # -- the writer -------------------------------------------------------------

    def fail(self, exc: BaseException, target: str) -> None:
        """Writer: tell the other ranks the save failed (before or during the write)."""
        self.vote.scatter_failure("outcome", CheckpointError(
            f"save_checkpoint(integrated_save=True): rank {self.writer}, which writes the file, "
            f"failed to save {target}: {type(exc).__name__}: {exc}"
        ))

    def announce(self, handle: SaveHandle, target: str) -> None:
        """Writer: post the outcome once ``handle`` is done (at once if it already is)."""

        def done(fut: Any) -> None:
            exc = fut.exception()
            if exc is not None:
                self.fail(exc, target)
            else:
                self.vote.scatter("outcome", [fut.result()] * len(self.ranks))  # one per rank

        # Future.exception() here would count as observing a failure the
        # caller must still see: read the raw future state instead.
        handle.committed.add_done_callback(lambda fut: done(_Peek(fut)))

    # -- the other ranks --------------------------------------------------------

    def follow(self, target: str, wait: bool) -> SaveHandle:
        """Non-writer: a handle that resolves with the writer's outcome."""
        handle = SaveHandle(target)
        handle.staged.set_result(None)  # the gather is done: nothing of this rank is read later

        def receive() -> None:
            try:
                path = self.vote.receive("outcome")
            except BaseException as exc:  # noqa: BLE001 - delivered through the handle
                handle.committed.set_exception(exc)
            else:
                handle.committed.set_result(path)

        if wait:
            receive()
            handle.wait()
        else:
            threading.Thread(target=receive, name="torchaux-integrated-wait", daemon=True).start()
        return handle


class _Peek:
    """A done future's result or exception, read without marking a failure observed."""

    def __init__(self, fut: Any) -> None:
        from concurrent.futures import Future

        self._exc = Future.exception(fut, 0)
        self._result = None if self._exc is not None else Future.result(fut, 0)

    def exception(self) -> BaseException | None:
        return self._exc

    def result(self) -> Any:
        return self._result


def gather(named: Mapping[str, Any]) -> tuple[dict[str, Any] | None, Integrated]:
    """``integrated_save=True``: full tensors on the writer (``None`` elsewhere), and the coordination.

    Every rank of the mesh must call it with the same names in the same order.
    """
    ranks = _mesh_ranks(named)
    coord = Integrated(ranks)
    dtensor = _dtensor_type()
    out: dict[str, Any] = {}
    for k, v in named.items():
        if dtensor is not None and isinstance(v, dtensor):
            full = v.detach().full_tensor()
            if coord.is_writer:
                out[k] = full
            del full  # the other ranks keep at most one full tensor at a time
        elif coord.is_writer:
            out[k] = v
    return (out if coord.is_writer else None), coord


def target_of(name: str | os.PathLike[str]) -> str:
    """The handle target a non-writer reports (it writes nothing, so nothing is resolved).

    >>> target_of("/ckpt/m.ckpt"), target_of("s3://bucket/m.ckpt")
    ('/ckpt/m.ckpt', 's3://bucket/m.ckpt')
    """
    from torchaux.checkpoint.storage import remote

    return os.fsdecode(name) if remote.is_url(name) else os.path.abspath(os.fsdecode(name))
