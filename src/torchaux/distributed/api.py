"""``save_async`` / ``save`` / ``load`` / ``load_full``: sharded checkpoints, never torn.

Call :func:`save_async` on every rank with that rank's state dict (DTensors of
FSDP2 ``fully_shard`` or tensor parallel, replicated tensors as with DDP,
non-tensor values).  It returns once the rank's shards are staged into the
torchaux host pool; on the writer thread each rank then plans with DCP's
``DefaultSavePlanner`` (replicated tensors are written once, by one rank),
writes its file into the save's staging folder, and votes.  Plans, results
and the outcome travel through the process group's store with deadlines
(:class:`~torchaux.distributed.commit.StoreVote`), never through a
collective from the background thread.  Only when every rank succeeded does
the coordinator publish (:func:`~torchaux.distributed.commit.publish`).

Without an initialised process group everything runs as one rank.

>>> import torch, torchaux.distributed as td
>>> d = os.path.join(doctest_tmp, "step_1")
>>> h = td.save_async({"w": torch.arange(3.0), "step": 1}, d)
>>> h.wait() == os.path.abspath(d)
True
>>> out = {"w": torch.zeros(3), "step": 0}
>>> td.load(out, d)
>>> out["w"].tolist(), out["step"]
([0.0, 1.0, 2.0], 1)
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from torchaux import _knobs
from torchaux.checkpoint.engine import fence
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.engine.staging import Snapshot
from torchaux.distributed.commit import StoreVote
from torchaux.distributed.reader import SafeFullLoadPlanner, SafeLoadPlanner, StorageReader
from torchaux.distributed.remote.access import locate
from torchaux.distributed.stager import rebuild_staged, stage_snapshot
from torchaux.distributed.writer import StorageWriter

__all__ = ["save_async", "save", "load", "load_full"]

_saver_lock = threading.Lock()
_saver: AsyncSaver | None = None
_sequence: dict[str, int] = {}


def _distributed_saver() -> AsyncSaver:
    global _saver
    with _saver_lock:
        if _saver is None:
            _saver = AsyncSaver(name="torchaux-dist-writer")
        return _saver


def _check_dir(checkpoint_dir: object, storage_options: object, who: str) -> str:
    """The checkpoint location, validated before any I/O (an absolute path, or a URL)."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a str or os.PathLike (a local directory or an s3:// URL); "
            f"found {type(checkpoint_dir).__name__}"
        )
    return locate(checkpoint_dir, storage_options, who)[0]


def _check_timeout(timeout: object) -> float:
    if timeout is None:
        return float(_knobs.distributed_timeout_s())
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None; found {timeout!r}")
    return float(timeout)


class _Group:
    """Rank, size and store of the save's process group (or a one-rank stand-in)."""

    def __init__(self, process_group: Any) -> None:
        if dist.is_initialized():
            pg = process_group or dist.group.WORLD
            self.rank = dist.get_rank(pg)
            self.world = dist.get_world_size(pg)
            self.ranks = dist.get_process_group_ranks(pg)
            self.name = "world" if pg is dist.group.WORLD else str(pg.group_name)
            self.store: Any = dist.distributed_c10d._get_default_store()
        else:
            if process_group is not None:
                raise ValueError(
                    "process_group was given but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group first, or pass process_group=None"
                )
            self.rank, self.world, self.ranks, self.name = 0, 1, [0], "local"
            self.store = dist.HashStore()

    def next_prefix(self) -> str:
        # Every rank saves in the same order (like any collective), so the
        # n-th save of this group has the same key prefix on every rank.
        n = _sequence.get(self.name, 0)
        _sequence[self.name] = n + 1
        return f"torchaux/dist/{self.name}/{n}"


def save_async(
    state_dict: Mapping[str, Any],
    checkpoint_dir: str | os.PathLike[str],
    *,
    process_group: Any = None,
    enc_key: bytes | None = None,
    enc_mode: str = "AES-GCM",
    timeout: float | None = None,
    model: torch.nn.Module | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SaveHandle:
    """Save this rank's part of a sharded checkpoint in the background.

    Args:
        state_dict: this rank's state dict (e.g. from
            ``torch.distributed.checkpoint.state_dict.get_state_dict``).
        checkpoint_dir: the checkpoint directory, the same on every rank
            (created if missing; its parent must exist), or an fsspec URL
            prefix such as ``s3://bucket/run/step-100`` (its bucket must
            exist).  An existing checkpoint there stays complete until the
            new one is committed.
        process_group: the group saving together (default: the world).
        enc_key: encrypt every chunk (16/24/32 bytes); ``enc_mode`` its mode.
        timeout: seconds to wait for the other ranks before failing (default
            ``TORCHAUX_DISTRIBUTED_TIMEOUT_S``, 600).
        model: the module being trained (e.g. the FSDP2 root): the call
            returns before the CPU copies, which the writer thread makes
            while the next forward and backward run; ``model``'s forward
            and every ``torch.optim`` step wait for (or make) the copies of
            what they change, as ``torchaux.save_async(..., model=)`` does
            (:mod:`torchaux.checkpoint.engine.fence`).  Any other in-place
            change of a saved tensor before its copy fails the save with
            :class:`~torchaux.errors.TensorChangedError`; nothing is committed.
        storage_options: fsspec options for a URL ``checkpoint_dir`` (e.g.
            ``{"client_kwargs": {"endpoint_url": ...}}``).  Each rank streams
            its shards from the staged buffers into a multipart upload of its
            data object; the coordinator PUTs ``.metadata`` last, which is the
            commit (:mod:`torchaux.distributed.remote.commit`).

    Raises:
        InvalidArgumentError: a legacy ``ShardedTensor`` in ``state_dict``.

    Returns:
        A :class:`~torchaux.SaveHandle`: ``staged`` resolves once this rank's
        snapshot is on the host, ``committed`` (and ``wait()``) once the whole
        checkpoint is published, on every rank.  If any rank fails or dies,
        nothing is committed and every surviving rank's handle raises a
        :class:`~torchaux.CheckpointError` naming the rank(s) and the cause
        within ``timeout``.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict; found {type(state_dict).__name__}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None; found {type(model).__name__}")
    target = _check_dir(checkpoint_dir, storage_options, "torchaux.distributed.save_async")
    seconds = _check_timeout(timeout)
    writer = StorageWriter(target, enc_key=enc_key, enc_mode=enc_mode,
                           storage_options=storage_options)
    group = _Group(process_group)
    start = time.monotonic()
    prefix = group.next_prefix()
    # The coordinator gives up first, so the others hear its reason before their own deadline.
    deadline = start + (seconds * 0.9 if group.rank == 0 else seconds)
    vote = StoreVote(group.store, prefix, group.rank, group.world, group.ranks, deadline)
    saver = _distributed_saver()
    # A save from inside an optimizer step (a step pre-hook) is staged eagerly:
    # that step's pre-hooks, the fence among them, have already run.
    deferred = model is not None and not fence.inside_optimizer_step()
    saver.reserve()
    snapshot: Snapshot | None = None
    try:
        # The staged dict (a DTensor per tensor) is built on the writer thread.
        skeleton, snapshot = stage_snapshot(dict(state_dict), saver.pool, model=model if deferred else None)
        if deferred:
            fence.arm(model, snapshot)  # type: ignore[arg-type]
    except BaseException as exc:
        if snapshot is not None:
            snapshot.release(saver.pool)
        saver.cancel_reservation()
        _fail_plan(vote, group.rank == 0, exc)
        raise

    def write(snap: Snapshot) -> str:
        return _run_save(lambda: rebuild_staged(skeleton, snap), writer, vote, group.rank == 0)

    try:
        handle = saver.submit(snapshot, write, target)
    except BaseException:
        if deferred:
            fence.disarm(model, snapshot)  # type: ignore[arg-type]
        raise
    if deferred:
        handle.staged.add_done_callback(lambda _: fence.disarm(model, snapshot))  # type: ignore[arg-type]
    return handle


def save(state_dict: Mapping[str, Any], checkpoint_dir: str | os.PathLike[str], **kwargs: Any) -> str:
    """:func:`save_async`, waited: returns the directory (or URL) once committed on every rank."""
    result = save_async(state_dict, checkpoint_dir, **kwargs).wait()
    assert result is not None
    return result


def _fail_plan(vote: StoreVote, coord: bool, exc: BaseException) -> None:
    """Tell the other ranks this rank cannot take part, where they are listening.

    The coordinator's failure goes where every other rank waits next (the
    central plan); a posted "plan" failure is read only by the coordinator, so
    from the coordinator it would leave the others waiting for the timeout.
    """
    if coord:
        vote.scatter_failure("central", exc)
    else:
        vote.post_failure("plan", exc)


def _run_save(build: Callable[[], dict[str, Any]], writer: StorageWriter, vote: StoreVote,
              coord: bool) -> str:
    """One save on the writer thread: build the staged dict, plan, write, vote, publish."""
    planner = DefaultSavePlanner()
    try:
        staged = build()
        planner.set_up_planner(staged, writer.storage_meta(), coord)
        writer.set_up_storage_writer(coord, rank=vote.rank)
        local = writer.prepare_local_plan(planner.create_local_plan())
    except BaseException as exc:
        _fail_plan(vote, coord, exc)
        raise
    metadata = None
    if coord:
        try:
            vote.post("plan", local)
            plans, metadata = planner.create_global_plan(vote.gather("plan"))
            plans = writer.prepare_global_plan(plans)
            vote.scatter("central", plans)
        except BaseException as exc:
            vote.scatter_failure("central", exc)
            raise
        central = plans[0]
    else:
        vote.post("plan", local)
        central = vote.receive("central")
    try:
        results = writer.write_data(planner.finish_plan(central), planner).value()
    except BaseException as exc:
        if coord:  # the others wait for the outcome next, not for the results
            vote.scatter_failure("outcome", exc)
        else:
            vote.post_failure("result", exc)
        raise
    vote.post("result", results)
    try:
        if coord:
            try:
                writer.finish(metadata, vote.gather("result"))  # type: ignore[arg-type]
            except BaseException as exc:
                vote.scatter_failure("outcome", exc)
                raise
            vote.scatter("outcome", "committed")
        else:
            vote.receive("outcome")
    except BaseException as exc:
        _discard(writer, exc)
        raise
    return writer.path


def _discard(writer: StorageWriter, exc: BaseException) -> None:
    """A failed save: this rank's uploaded objects go (object stores); the save's error stays first."""
    try:
        writer.discard_failed()
    except Exception as cleanup:  # noqa: BLE001 - reported with the save's own error
        if hasattr(exc, "add_note"):
            exc.add_note(
                f"removing this rank's data object of the failed save also failed ({cleanup!r}); "
                "the next committed save of this checkpoint removes it"
            )


@contextlib.contextmanager
def _dcp_errors() -> Iterator[None]:
    # DCP wraps every rank's failure in its CheckpointException; surface the
    # original torchaux error (IntegrityError, DecryptionError, ...) instead.
    try:
        yield
    except CheckpointException as exc:
        for failure in exc.failures.values():  # rank -> (exception, stack summary)
            original = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(original, BaseException):
                raise original from exc
        raise


def load(
    state_dict: dict[str, Any],
    checkpoint_dir: str | os.PathLike[str],
    *,
    process_group: Any = None,
    dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM",
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Load a checkpoint into ``state_dict`` in place, resharding as needed.

    Every rank of ``process_group`` calls it with its own state dict (DTensors
    get their local shards, plain tensors the full value); without a process
    group it loads into a plain single-process state dict.  Works for
    checkpoints of any world size, torchaux's or stock DCP's, from a local
    directory or an fsspec URL (``s3://...`` with ``storage_options``: chunks
    are read with ranged GETs).

    Raises:
        FileNotFoundError: no committed checkpoint in ``checkpoint_dir``.
        IntegrityError: a checksum mismatch, a missing or truncated data file.
        DecryptionError: wrong key or mode, or no key for an encrypted checkpoint.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict; found {type(state_dict).__name__}")
    target = _check_dir(checkpoint_dir, storage_options, "torchaux.distributed.load")
    reader = StorageReader(target, dec_key=dec_key, dec_mode=dec_mode,
                           storage_options=storage_options)
    no_dist = not dist.is_initialized()
    reader.read_metadata()  # DCP turns metadata errors into strings: raise ours first
    with _dcp_errors(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(),
                 process_group=process_group, no_dist=no_dist)


def load_full(
    checkpoint_dir: str | os.PathLike[str], *, dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM", storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a whole checkpoint into one process: every tensor at its full, global shape.

    No process group needed (like DCP's ``dcp_to_torch_save``, without the pickle risk).
    ``checkpoint_dir`` may be an fsspec URL, with ``storage_options``.
    """
    target = _check_dir(checkpoint_dir, storage_options, "torchaux.distributed.load_full")
    reader = StorageReader(target, dec_key=dec_key, dec_mode=dec_mode,
                           storage_options=storage_options)
    out: dict[str, Any] = {}
    reader.read_metadata()
    with _dcp_errors():
        _load_state_dict(out, storage_reader=reader, planner=SafeFullLoadPlanner(), no_dist=True)
    return out
