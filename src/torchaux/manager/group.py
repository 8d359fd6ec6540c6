"""The ranks of a distributed ``CheckpointManager`` agreeing with each other.

Three channels, each used where it cannot deadlock or diverge:

* :meth:`RankGroup.agree` - one all-reduce (MAX) of a few integers on the
  **caller's thread**, on host memory (a gloo group: :func:`_host_group`),
  inside every ``save()`` call on every rank: whether
  any rank refused the call, holds an unreported failure, passed ``force``
  or received a preemption signal, and the step each rank passed.  So a
  signal delivered to one rank only (a scheduler notice to one node) makes
  every rank save the same step; orbax syncs its preemption check the same
  way (``reached_preemption`` over all hosts), torchtitan saves on a
  ``step % interval`` every rank computes alike (ecosystem-anchors.md §3);
* :meth:`RankGroup.broadcast` - rank 0's view (the committed steps, which step
  to restore) to every rank, on the caller's thread, at start-up and restore;
* :meth:`RankGroup.post` / :meth:`RankGroup.fetch` - rank 0's verdict on a
  step (published, or why not) and its listing after retention, through the
  process group's key-value store, with a deadline: the manager's background
  thread waits there, never in a collective (a collective from a background
  thread can interleave with the training loop's own and hang; the store
  cannot, and a dead rank 0 turns into an error within the timeout).

Keys are ``torchaux/manager/<token>/<n>/<what>``: the token is drawn by rank 0
when the manager starts and broadcast, ``n`` counts the manager's saves (the
same on every rank, as every rank saves the same steps).  The last reader
deletes a key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from torchaux.errors import CheckpointError

__all__ = ["RankGroup", "Agreement", "resolve_group"]


def resolve_group(process_group: Any) -> RankGroup | None:
    """The group a manager saves with, or None for one process (see ``CheckpointManager``).

    ``None``: the world when torch.distributed is initialised with more than
    one rank; ``True``: the world (must be initialised); ``False``: one process
    even inside a distributed job; a ``ProcessGroup``: that group.

    >>> resolve_group(None) is None, resolve_group(False) is None  # not initialised here
    (True, True)
    """
    if process_group is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if process_group is None:
        return RankGroup(None) if ready and dist.get_world_size() > 1 else None
    if process_group is not True and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None, True, False or a torch.distributed.ProcessGroup; "
            f"got {type(process_group).__name__}"
        )
    if not ready:
        raise ValueError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first, or pass process_group=None"
        )
    return RankGroup(None if process_group is True else process_group)


def _host_group(process_group: Any) -> tuple[Any, torch.device]:
    """The group and device the manager's own collectives use.

    The group itself where it reduces host tensors (gloo, or "cpu:gloo,cuda:nccl").
    A device-only group (NCCL) would make every ``save()`` wait for the
    device: the agreed flags are read on the host, and the all-reduce queues
    behind the step's kernels.  So a gloo group over the same ranks is made
    once - what torchtitan's async checkpointer and DCP's ``async_save``
    documentation use for checkpoint coordination.
    """
    kind = dist.distributed_c10d._get_object_coll_device(process_group)
    if kind == "cpu":
        return process_group, torch.device("cpu")
    if dist.is_gloo_available():
        ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
        host = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        return host, torch.device("cpu")
    device = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    return process_group, device


@dataclass(frozen=True)
class Agreement:
    """What every rank learnt from one ``save()`` call's all-reduce."""

    refused: bool  # some rank's arguments were invalid
    failed: bool  # some rank holds a failure it has not raised yet
    force: bool  # some rank passed force=True
    preempted: bool  # some rank received a watched signal
    lowest_step: int
    highest_step: int


class RankGroup:
    """Rank, size, collectives and store of the manager's process group."""

    def __init__(self, process_group: Any) -> None:
        self.pg = process_group  # None: the world
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.is_coordinator = self.rank == 0
        # A client of its own: a TCPStore client blocked in wait() holds its
        # connection, so sharing it with the distributed save's vote (the
        # writer thread) deadlocks both (Store.clone's docstring: one per thread).
        store = dist.distributed_c10d._get_default_store()
        try:
            self._store: Any = store.clone()
        except (RuntimeError, NotImplementedError):  # no clone(): share it
            self._store = store
        self.token = ""
        self._host_pg, self._device = _host_group(process_group)
        self._src = dist.get_global_rank(process_group or dist.group.WORLD, 0)

    def agree(
        self, *, refused: bool, failed: bool, force: bool, preempted: bool, step: int
    ) -> Agreement:
        """One all-reduce of six int64s: the OR of the flags and the range of the steps."""
        flags = [int(refused), int(failed), int(force), int(preempted), step, -step]
        values = torch.tensor(flags, dtype=torch.int64, device=self._device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._host_pg)
        out = values.tolist()
        return Agreement(
            refused=bool(out[0]), failed=bool(out[1]), force=bool(out[2]),
            preempted=bool(out[3]), lowest_step=-out[5], highest_step=out[4],
        )

    def agree_call(
        self, what: str, step: object, refused: BaseException | None, *, failed: bool = False,
        force: bool = False, preempted: bool = False,
    ) -> Agreement:
        """:meth:`agree` for one ``save``/``restore`` call; raise on every rank if one refused it.

        ``refused`` is this rank's validation error (raised here, after the
        all-reduce, so that the other ranks raise too instead of waiting).
        """
        valid = isinstance(step, int) and not isinstance(step, bool) and step >= 0
        agreed = self.agree(refused=refused is not None, failed=failed, force=force,
                            preempted=preempted, step=step if valid else -1)  # type: ignore[arg-type]
        if agreed.refused:
            raise refused or ValueError(
                f"{what}(step={step!r}) was refused on another rank (its error says why); every "
                "rank raises so that none waits for the others"
            )
        if agreed.lowest_step != agreed.highest_step:
            raise ValueError(
                f"{what}() was called with different steps on different ranks (from "
                f"{agreed.lowest_step} to {agreed.highest_step}; -1: None); every rank must pass "
                "the same step"
            )
        return agreed

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass None)."""
        box = [obj]
        dist.broadcast_object_list(box, src=self._src, group=self._host_pg, device=self._device)
        return box[0]

    def _key(self, n: int, what: str) -> str:
        return f"torchaux/manager/{self.token}/{n}/{what}"

    def post(self, n: int, what: str, payload: dict[str, Any]) -> None:
        """Rank 0: publish ``payload`` (JSON) for the other ranks' :meth:`fetch`."""
        if self.world == 1:
            return
        try:
            self._store.set(self._key(n, what), json.dumps(payload))
        except Exception as exc:  # noqa: BLE001 - re-raised as a CheckpointError
            raise CheckpointError(
                f"CheckpointManager: rank 0 could not reach the process group's store to tell "
                f"the other ranks about save {n} ({exc}); they will time out"
            ) from exc

    def fetch(self, n: int, what: str, timeout_s: float) -> dict[str, Any]:
        """Other ranks: rank 0's payload for save ``n``, waiting up to ``timeout_s``."""
        key = self._key(n, what)
        try:
            self._store.wait([key], timedelta(seconds=timeout_s))
            raw = self._store.get(key)
            if self._store.add(key + "/reads", 1) == self.world - 1:  # the last reader
                self._store.delete_key(key)
                self._store.delete_key(key + "/reads")
        except Exception as exc:  # noqa: BLE001 - re-raised as a CheckpointError
            raise CheckpointError(
                f"CheckpointManager rank {self.rank}: no word from rank 0 on save {n} ({what}) "
                f"within {timeout_s:.0f} s ({exc}); rank 0 may have died or hung. Whether the "
                "step was committed is known from the step folders (latest_step() in a new run); "
                "raise TORCHAUX_DISTRIBUTED_TIMEOUT_S if rank 0 is only slow"
            ) from exc
        doc: dict[str, Any] = json.loads(raw)
        return doc
