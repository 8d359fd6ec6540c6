"""Staging a (sharded) state dict into the torchaux host pool, and DCP's ``AsyncStager``.

:func:`stage_state_dict` walks a state dict (nested dicts, lists, tuples),
collects every tensor's *local* data (a DTensor's local shard, a plain
tensor), and copies them all with the engine's
:func:`~torchaux.checkpoint.engine.staging.stage` into warm buffers of a
:class:`~torchaux.checkpoint.engine.pool.HostBufferPool` (pinned, side-stream
copies for accelerator tensors).  Non-tensor values are deep-copied at the
call.  The staged dict has the same structure; each DTensor becomes a DTensor
with the same mesh and placements around its staged host shard, so DCP's
planners see the same global layout.

>>> import torch
>>> from torchaux.checkpoint.engine.pool import HostBufferPool
>>> live = {"w": torch.ones(2), "opt": {"step": 3, "lr": [0.1]}}
>>> staged, snap = stage_state_dict(live, HostBufferPool())
>>> _ = live["w"].add_(1)
>>> staged["w"].tolist(), staged["opt"]
([1.0, 1.0], {'step': 3, 'lr': [0.1]})
"""

from __future__ import annotations

import copy
import pickle
import weakref
from typing import Any, NamedTuple

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from torchaux.checkpoint.engine.fence import model_tensors
from torchaux.checkpoint.engine.pool import HostBufferPool
from torchaux.checkpoint.engine.staging import Snapshot, stage
from torchaux.errors import InvalidArgumentError

__all__ = ["stage_state_dict", "stage_snapshot", "rebuild_staged", "Stager"]


class _TensorSlot(NamedTuple):
    index: int
    spec: Any = None  # DTensorSpec for DTensors


# Values fixed by reference: immutable, so the skeleton may share them (no deepcopy).
_ATOMIC = frozenset({int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device})


def _collect(obj: Any, tensors: list[torch.Tensor], path: Any) -> Any:
    # Runs on the training thread at every save: exact-type dispatch for the
    # common nodes, a (parent, key) tuple for the path (formatted only for an
    # error), and no deepcopy of immutable values.
    kind = type(obj)
    if kind is dict:
        return {k: _collect(v, tensors, (path, k)) for k, v in obj.items()}
    if kind in _ATOMIC:
        return obj
    if isinstance(obj, DTensor):
        local = obj._local_tensor
        tensors.append(local.detach() if local.requires_grad else local)
        return _TensorSlot(len(tensors) - 1, obj._spec)
    if isinstance(obj, torch.Tensor):
        if isinstance(obj, ShardedTensor):
            raise InvalidArgumentError(
                f"{_path(path) or 'state_dict'} is a legacy ShardedTensor, which "
                "torchaux.distributed does not save: expected DTensors (FSDP2 fully_shard, "
                "tensor parallel; get_state_dict returns them) or plain tensors; save a "
                "ShardedTensor state dict with stock torch.distributed.checkpoint.save instead"
            )
        tensors.append(obj.detach() if obj.requires_grad else obj)
        return _TensorSlot(len(tensors) - 1)
    if isinstance(obj, dict):
        return type(obj)((k, _collect(v, tensors, (path, k))) for k, v in obj.items())
    if kind is list or kind is tuple:
        return kind(_collect(v, tensors, (path, i)) for i, v in enumerate(obj))
    return copy.deepcopy(obj)  # Python values are fixed at the call


def _path(path: Any) -> str:
    """``"a.b.0"`` from :func:`_collect`'s ``((("", "a"), "b"), 0)``."""
    keys = []
    while isinstance(path, tuple):
        path, key = path
        keys.append(str(key))
    return ".".join(reversed(keys))


def _rebuild(skeleton: Any, snapshot: Snapshot) -> Any:
    if isinstance(skeleton, _TensorSlot):
        local = snapshot.staged_tensor(str(skeleton.index))
        if skeleton.spec is None:
            return local
        return DTensor(local, skeleton.spec, requires_grad=False)
    if isinstance(skeleton, dict):
        return type(skeleton)((k, _rebuild(v, snapshot)) for k, v in skeleton.items())
    if isinstance(skeleton, (list, tuple)) and type(skeleton) in (list, tuple):
        return type(skeleton)(_rebuild(v, snapshot) for v in skeleton)
    return skeleton


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def stage_state_dict(
    state_dict: Any, pool: HostBufferPool, *, model: torch.nn.Module | None = None
) -> tuple[Any, Snapshot]:
    """Snapshot ``state_dict`` into ``pool``; return the staged dict and its snapshot.

    CPU copies are done before returning, or, with ``model``, left to
    ``snapshot.finish_staging()`` and the fences (``model``'s tensors
    first), each checked against its version counter at the call.
    Accelerator copies are queued on a side stream (call
    ``snapshot.finish_staging()`` before reading them).  Give the buffers
    back with ``snapshot.release(pool)`` once written.
    """
    skeleton, snapshot = stage_snapshot(state_dict, pool, model=model)
    try:
        staged = rebuild_staged(skeleton, snapshot)
    except BaseException:
        snapshot.release(pool)
        raise
    return staged, snapshot


def rebuild_staged(skeleton: Any, snapshot: Snapshot) -> Any:
    """The staged dict of :func:`stage_snapshot`'s ``skeleton``: DTensors around staged shards.

    Reads only the snapshot's host buffers and the skeleton's fixed layout,
    so it may run on the writer thread (it costs a DTensor per tensor, which
    ``torchaux.distributed.save_async`` keeps off the training thread).
    """
    return _rebuild(skeleton, snapshot)


def stage_snapshot(
    state_dict: Any, pool: HostBufferPool, *, model: torch.nn.Module | None = None
) -> tuple[Any, Snapshot]:
    """:func:`stage_state_dict` without building the staged dict: ``(skeleton, snapshot)``.

    The skeleton is the state dict's structure with its Python values
    copied and each tensor replaced by its slot (and DTensor layout).
    """
    tensors: list[torch.Tensor] = []
    skeleton = _collect(state_dict, tensors, "")
    snapshot = stage(
        tensors,
        pool=pool,
        pickle_module=pickle,
        pickle_protocol=2,
        defer_cpu_copies=model is not None,
        # An FSDP2 module's parameters are DTensors: their shards are what is staged.
        model_buffers=[_local(t) for t in model_tensors(model)] if model is not None else (),
        index=None,  # each tensor by its position: the skeleton's slot indices
        # The writer saves each chunk itself (writer._write_chunk): no data.pkl.
        serialize=False,
    )
    return skeleton, snapshot


class Stager(AsyncStager):
    """DCP ``AsyncStager`` that stages into a warm torchaux host pool.

    ``dcp.async_save(sd, storage_writer=StorageWriter(path), async_stager=Stager())``.
    ``stage`` returns once the copy is on the host (so the caller may change
    the live tensors), and the buffers of a staged dict go back to the pool
    once DCP has dropped every staged tensor (weak references), so the next
    save copies into warm memory.  With ``async_checkpointer_type=PROCESS``
    wait for the previous save's future before staging the next one, as
    with DCP's caching stagers (the checkpoint process may still read them).

    >>> import torch
    >>> s = Stager()
    >>> out = s.stage({"w": torch.ones(2)})
    >>> out["w"].tolist()
    [1.0, 1.0]
    >>> s.close()
    """

    _synchronize_after_execute: bool = False

    def __init__(self) -> None:
        self.pool = HostBufferPool()
        self._live: list[tuple[Snapshot, list[weakref.ref[torch.Tensor]]]] = []

    def stage(self, state_dict: Any) -> Any:  # type: ignore[override]
        """Copy ``state_dict`` into host buffers; return the staged dict."""
        self._recycle()
        staged, snapshot = stage_state_dict(state_dict, self.pool)
        try:
            snapshot.finish_staging()
        except BaseException:
            snapshot.release(self.pool)
            raise
        refs: list[weakref.ref[torch.Tensor]] = []
        _weak_tensors(staged, refs)
        self._live.append((snapshot, refs))
        return staged

    def _recycle(self) -> None:
        still = []
        for snapshot, refs in self._live:
            if any(r() is not None for r in refs):
                still.append((snapshot, refs))
            else:
                snapshot.release(self.pool)
        self._live = still

    def synchronize_staging(self) -> None:
        """No-op: :meth:`stage` returns with the copy complete."""

    def close(self) -> None:
        """Drop the pool (buffers still referenced by a staged dict stay valid)."""
        self._live = []
        self.pool.clear()


def _weak_tensors(obj: Any, out: list[weakref.ref[torch.Tensor]]) -> None:
    if isinstance(obj, DTensor):
        out.append(weakref.ref(obj))
        out.append(weakref.ref(obj._local_tensor))
    elif isinstance(obj, torch.Tensor):
        out.append(weakref.ref(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _weak_tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _weak_tensors(v, out)
