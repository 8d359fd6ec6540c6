"""``CheckpointManager``: save every N steps, keep the right ones, resume from the newest complete one.

What one ``save()`` does (the traps each line avoids are in
ecosystem-anchors.md §3):

1. validate the step, metrics and options before any work;
2. ask the :class:`~torchaux.manager.policy.SavePolicy` whether this step is
   saved (a preemption notice or ``force`` saves regardless);
3. stage on the caller's thread with the engine (:func:`torchaux.save_async`,
   or :func:`torchaux.save_checkpoint` when encrypting) into the step's temp
   location; at most one save is in flight (the engine's back-pressure);
4. on the writer thread: write, commit the state file, write the metadata
   (commit marker) and publish the step atomically (:mod:`.local_store`,
   :mod:`.remote_store`) - so the handle resolves only once the step counts;
5. on the manager's background thread: update the ``latest`` pointer (a hint)
   and delete the committed steps retention no longer keeps (never one in
   flight, never the newest committed).

Every failure - of a save, of the pointer update or of a deletion - is raised
by the handle, or by the next ``save``, ``wait_until_finished`` or ``close``.

With a process group every rank calls ``save``/``restore``; a step is then a
:mod:`torchaux.distributed` checkpoint published by rank 0 (:mod:`.sharded`),
and the ranks agree on every decision (:mod:`.group`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, BinaryIO

from torchaux.checkpoint.api import save_async
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.storage import remote
from torchaux.errors import CheckpointError, SaveClosedError
from torchaux.manager.background import BackgroundWork, chain
from torchaux.manager.group import resolve_group
from torchaux.manager.local_store import LocalStore
from torchaux.manager.policy import RetentionPolicy, SavePolicy
from torchaux.manager.preemption import PreemptionWatcher, parse_signals
from torchaux.manager.remote_store import RemoteStore
from torchaux.manager.restore import load_step
from torchaux.manager.sharded import ShardedSteps
from torchaux.manager.steps import StepInfo, check_metrics, check_step

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Periodic, atomic, retained checkpoints of a training run, on a local disk or S3.

    Args:
        directory: local folder (created if missing) or ``s3://bucket/prefix``.
        save_interval_steps: ``save`` writes steps divisible by this.
        keep_latest: newest committed steps to keep (None: keep all).
        keep_every_steps: also keep steps divisible by this, forever.
        best_fn: a metric name or ``metrics -> number``; with ``keep_best``
            the best steps are kept too.
        best_mode: ``"min"`` or ``"max"``.
        keep_best: best steps to keep (needs ``best_fn``).
        async_save: return once staged (True) or once durable (False).
        enc_key, enc_mode: encrypt every step (:func:`torchaux.save_checkpoint`;
            the state must then be a flat ``name -> tensor/number/str`` dict,
            except for distributed steps, which encrypt every chunk).
        storage_options: fsspec options for an ``s3://`` directory.
        preemption: ``True`` to watch SIGTERM and SIGUSR1, or the signals to
            watch; after one arrives the next ``save`` saves whatever the step
            and waits until it is durable, and :meth:`reached_preemption` turns True.
            With a process group a signal on any rank counts for every rank.
        process_group: who saves together.  ``None`` (default): every rank of
            the world when torch.distributed is initialised with more than one
            rank, else this process alone; ``True``: the world (must be
            initialised); a ``ProcessGroup``: that group; ``False``: this
            process alone even in a distributed job.  With a group, every
            rank constructs the manager and calls ``save``/``restore`` with the
            same steps (each a collective on the caller's thread), ``directory``
            is a local path every rank sees (a shared file system) or an
            ``s3://`` URL (the same ``storage_options`` on every rank), and
            ``state`` is the rank's state dict (DTensor/FSDP2 from
            ``get_state_dict``, replicated DDP tensors, plain values).  Rank 0's
            ``metrics`` are the ones kept; the listing methods return the
            committed steps as rank 0 last reported them, the same on every rank.

    Example:
        >>> import os, torch, torchaux
        >>> run = os.path.join(doctest_tmp, "run")
        >>> with torchaux.CheckpointManager(run, save_interval_steps=2, keep_latest=2) as mgr:
        ...     for step in range(7):
        ...         _ = mgr.save(step, {"w": torch.full((2,), float(step))})
        >>> mgr = torchaux.CheckpointManager(run)
        >>> mgr.all_steps(), mgr.restore()["w"].tolist()
        ([4, 6], [6.0, 6.0])
        >>> mgr.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_interval_steps: int = 1,
        keep_latest: int | None = 3,
        keep_every_steps: int | None = None,
        best_fn: Callable[[Mapping[str, float]], float] | str | None = None,
        best_mode: str = "min",
        keep_best: int | None = None,
        async_save: bool = True,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
        storage_options: dict[str, Any] | None = None,
        preemption: bool | Iterable[int] = False,
        process_group: Any = None,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)) or os.fspath(directory) in ("", b""):
            raise TypeError(
                f"directory must be a non-empty local path or s3:// URL; got {directory!r}"
            )
        self._save_policy = SavePolicy(save_interval_steps)
        self._retention = RetentionPolicy(
            keep_latest=keep_latest, keep_every_steps=keep_every_steps,
            best_fn=best_fn, best_mode=best_mode, keep_best=keep_best,
        )
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be a bool; got {type(async_save).__name__}")
        if enc_key is not None:
            from torchaux.checkpoint.crypto.header import validate_key

            validate_key(enc_key, enc_mode)
        elif not isinstance(enc_mode, str):
            raise TypeError(f"enc_mode must be a str; got {type(enc_mode).__name__}")
        location = os.fspath(directory)
        self._options = remote.check_storage_options(storage_options, location) or None
        signals = parse_signals(preemption)
        self._store: LocalStore | RemoteStore = (
            RemoteStore(location, self._options) if remote.is_url(location)
            else LocalStore(location)
        )
        self.directory = self._store.location
        group = resolve_group(process_group)
        self._async = async_save
        self._enc_key = enc_key
        self._enc_mode = enc_mode
        self._lock = threading.Lock()
        self._infos: dict[str, StepInfo] = {}  # targets submitted, not yet committed
        self._sharded: ShardedSteps | None = None
        if group is None:
            self._store.remove_orphans()  # temps of crashed saves: nobody is writing them now
            committed = self._store.committed()
        else:  # rank 0 removes orphans (the group is not saving yet) and lists for everyone
            self._sharded = ShardedSteps(group, self._store, enc_key, enc_mode)
            committed = self._sharded.start()
        self._last_step = committed[-1].step if committed else None
        self._saved_since_signal = False
        self._work = BackgroundWork("torchaux-manager")
        self._saver = AsyncSaver(sink=self._sink, name="torchaux-manager-writer")
        self._watcher = PreemptionWatcher(signals) if signals else None
        self._closed = False

    # -- saving -----------------------------------------------------------------

    def save(
        self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None, force: bool = False
    ) -> SaveHandle | None:
        """Save ``state`` as ``step`` if the interval (or ``force``, or a preemption) says so.

        Returns:
            The step's handle (``wait()`` returns once the step is committed),
            or None when the policy skips the step.

        Raises:
            TypeError, ValueError: a non-int or negative step, a step not
                greater than the newest saved one (unless ``force``), bad metrics.
            Exception: an earlier background failure nobody observed.
        """
        if self._closed:
            raise SaveClosedError("this CheckpointManager is closed; create a new one to save")
        if self._sharded is not None:  # every rank reaches one all-reduce, whatever its arguments
            return self._save_sharded(step, state, metrics, force)
        info = self._check_call(step, metrics, force)
        self._work.raise_failure()
        preempted = self._watcher is not None and self._watcher.triggered
        if not (force or preempted or self._save_policy.should_save(step)):
            return None
        return self._finish_call(self._submit(info, state), info.step, preempted)

    def _check_call(self, step: int, metrics: Mapping[str, Any] | None, force: bool) -> StepInfo:
        check_step(step)
        info = StepInfo(step, check_metrics(metrics), self._enc_mode if self._enc_key else None)
        if not isinstance(force, bool):
            raise TypeError(f"force must be a bool; got {type(force).__name__}")
        if not force and self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} is not greater than the newest saved step {self._last_step} of "
                f"{self.directory!r}; pass force=True to save (and replace) it anyway"
            )
        return info

    def _finish_call(self, handle: SaveHandle, step: int, preempted: bool) -> SaveHandle:
        self._last_step = max(step, self._last_step if self._last_step is not None else -1)
        if not self._async or preempted:
            handle.wait()
            if preempted:
                self._saved_since_signal = True
        return handle

    def _save_sharded(
        self, step: int, state: Any, metrics: Mapping[str, Any] | None, force: bool
    ) -> SaveHandle | None:
        assert self._sharded is not None
        refused: BaseException | None = None
        try:
            info = self._check_call(step, metrics, force)
        except (TypeError, ValueError) as exc:
            refused = exc
        agreed = self._sharded.group.agree_call(
            "save", step, refused, failed=self._work.has_failure(), force=force is True,
            preempted=self._watcher is not None and self._watcher.triggered,
        )
        if agreed.failed:
            self.wait_until_finished()  # raises this rank's copy of the failure
            raise CheckpointError("an earlier save or its retention failed on another rank, which "
                                  "raised it; this rank raises too, so that none waits for the others")
        if not (agreed.force or agreed.preempted or self._save_policy.should_save(step)):
            return None
        handle = self._sharded.save(info, state, self._work, self._after_commit)
        return self._finish_call(handle, info.step, agreed.preempted)

    def _submit(self, info: StepInfo, state: Any) -> SaveHandle:
        target = self._store.state_target(info.step)
        with self._lock:
            self._infos[target] = info
        try:
            if self._enc_key is not None:
                from torchaux.checkpoint.save import save_checkpoint

                extra = {"storage_options": self._options} if self._options else {}
                inner = save_checkpoint(
                    state, target, async_save=True, enc_key=self._enc_key,
                    enc_mode=self._enc_mode, saver=self._saver, **extra,
                )
            else:
                inner = save_async(state, target, saver=self._saver, storage_options=self._options)
        except BaseException:
            with self._lock:
                self._infos.pop(target, None)
            self._store.discard(target)
            raise
        handle = SaveHandle(self._store.state_path(info.step))
        self._work.track(handle)
        chain(inner.staged, handle.staged)
        inner.committed.add_done_callback(lambda done: self._finished(done, inner, handle))
        return handle

    @contextlib.contextmanager
    def _sink(self, target: str) -> Iterator[BinaryIO]:
        # Runs on the writer thread: the step is committed when this exits cleanly.
        with self._lock:
            info = self._infos[target]
        try:
            with self._store.commit(target, info) as f:
                yield f
        finally:
            with self._lock:
                self._infos.pop(target, None)

    def _finished(self, done: Future[Any], inner: SaveHandle, handle: SaveHandle) -> None:
        # The writer thread: the failure now belongs to the manager's handle.
        exc = inner.exception()
        if exc is not None:
            if not handle.staged.done():
                handle.staged.set_exception(exc)
            handle.committed.set_exception(exc)  # raised later unless the caller waits on it
            return
        self._work.put(self._after_commit)
        handle.committed.set_result(handle.target)

    def _after_commit(self) -> None:
        committed = self._store.committed()
        if not committed:
            return
        self._store.write_latest(committed[-1].step)
        with self._lock:
            in_flight = {info.step for info in self._infos.values()}
        if self._sharded is not None:
            in_flight |= self._sharded.in_flight()
        for step in self._retention.to_delete(committed):
            if step not in in_flight:
                self._store.delete(step)

    def wait_until_finished(self) -> None:
        """Wait for the save in flight, the pointer update and deletions; raise any failure.

        With a process group this also waits for rank 0's pointer update and
        retention of this rank's saves, and raises a failure of theirs.
        """
        self._work.drain()
        self._work.raise_failure()

    def close(self) -> None:
        """Finish everything (raising a failure), stop the threads, restore signal handlers."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self._work.stop()
            self._saver.close()
            if self._watcher is not None:
                self._watcher.uninstall()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # the body's exception propagates; keep this one with it
            if hasattr(exc, "add_note"):
                exc.add_note(f"CheckpointManager.close also failed: {close_exc!r}")

    # -- reading ----------------------------------------------------------------

    def _listing(self) -> list[StepInfo]:
        if self._sharded is None:
            return self._store.committed()  # storage is the truth
        return self._sharded.view()

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first (read from storage; with a group: rank 0's listing)."""
        return [info.step for info in self._listing()]

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        return steps[-1] if (steps := self.all_steps()) else None

    def best_step(self) -> int | None:
        """The committed step with the best metrics by ``best_fn``/``best_mode`` (None if none)."""
        if self._retention.best_fn is None:
            raise ValueError("best_step needs best_fn; pass best_fn='loss' (or a callable)")
        best = self._retention.best(self._listing(), 1)
        return best[0] if best else None

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with a committed step."""
        return dict(self._committed_info(step).metrics)

    def reached_preemption(self) -> bool:
        """True once a watched signal arrived and a save after it is durable: exit the loop."""
        return self._saved_since_signal  # set only by a save after a signal (any rank's)

    def _committed_info(self, step: int) -> StepInfo:
        check_step(step, "restore")
        committed = {info.step: info for info in self._listing()}
        if step not in committed:
            raise FileNotFoundError(
                f"step {step} is not a committed step of {self.directory!r}; committed: "
                f"{sorted(committed)}"
            )
        return committed[step]

    def restore(self, step: int | None = None, *, state: Any = None, map_location: Any = "cpu") -> Any:
        """Load a committed step (default: the newest); into ``state`` in place if given.

        A distributed step loads into ``state`` in place with resharding (any
        world size, this process alone included), or whole without ``state``
        (tensors at their global shape, on the CPU).  With a process group
        every rank calls it; rank 0 chooses the step for all.

        Raises:
            FileNotFoundError: no committed step (or not ``step``).
        """
        if self._sharded is not None:
            info = self._sharded.choose_agreed(step, self._work)
            return self._load(info, state, "cpu", self._sharded.group.pg)
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"{self.directory!r} holds no committed step to restore; check "
                    "latest_step() is not None first"
                )
        return self._load(self._committed_info(step), state, map_location, None)

    def _load(self, info: StepInfo, state: Any, map_location: Any, group: Any) -> Any:
        return load_step(self._store, info, state, enc_key=self._enc_key,
                         storage_options=self._options, map_location=map_location, group=group)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, steps={self.all_steps()})"
