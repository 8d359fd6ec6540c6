"""Distributed manager steps: every rank saves its shards, rank 0 publishes and keeps the books.

One distributed step, on every rank of the group (:mod:`.group` for how the
ranks agree):

1. ``save()`` on the caller's thread calls :func:`torchaux.distributed.save_async`
   with the rank's state dict into the step's temp directory
   (:meth:`~torchaux.manager.local_store.LocalStore.sharded_target`); it
   returns once the rank's shards are staged;
2. the distributed save writes every rank's file and commits inside the temp
   directory (its all-rank vote: a failure on any rank fails it on every rank);
3. :meth:`ShardedSteps.finish` on the manager's background thread: rank 0
   writes the step's metadata (its own ``metrics``) and renames the temp
   directory to ``step-<N>`` - the commit of the step - then posts its verdict
   to the store; the other ranks wait for that verdict, so every rank's handle
   resolves the same way, and only once the step is listed;
4. rank 0 updates ``latest`` and runs retention, then posts the committed
   listing (:meth:`ShardedSteps.settle`); the others take it as their view, so
   ``all_steps()`` is the same on every rank once ``wait_until_finished()``
   returned on each, without any rank listing the shared directory.

On an object store (``s3://``, :class:`~torchaux.manager.remote_store.RemoteStore`)
there is no rename: step 1 writes straight under ``step-<N>/`` (its
``.metadata`` PUT last, :mod:`torchaux.distributed.remote.commit`), and in
step 3 rank 0 PUTs ``step-<N>/metadata.json``, the commit marker, after it; a
step without the marker is never listed and is removed by the next
manager's start-up.  Replacing a step (``force``) first removes its marker.

Restoring: rank 0 lists the committed steps, picks one and broadcasts it
(:meth:`ShardedSteps.choose`); then every rank loads it with resharding
(:func:`torchaux.distributed.load`).  Nothing can delete the chosen step
meanwhile: retention runs only after a commit, and no later step can commit
before every rank has returned from ``restore``.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from torchaux import _knobs
from torchaux.checkpoint.engine.saver import SaveHandle
from torchaux.checkpoint.storage.directory import remove_tree
from torchaux.errors import CheckpointError
from torchaux.manager.background import BackgroundWork, chain
from torchaux.manager.group import RankGroup
from torchaux.manager.local_store import LocalStore
from torchaux.manager.remote_store import RemoteStore
from torchaux.manager.steps import LAYOUT_SHARDED, StepInfo, check_step, parse_step

__all__ = ["ShardedSteps", "load_sharded"]

#: Temp directories of distributed saves in flight in this process (any manager), kept
#: by every manager's start-up cleanup.
_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


def _as_infos(docs: list[dict[str, Any]]) -> list[StepInfo]:
    return [StepInfo(**doc) for doc in docs]


class ShardedSteps:
    """The distributed half of a :class:`~torchaux.CheckpointManager` (shared disk or S3)."""

    def __init__(
        self, group: RankGroup, store: LocalStore | RemoteStore, enc_key: bytes | None,
        enc_mode: str,
    ) -> None:
        self.group = group
        self.store = store
        self.enc_key = enc_key
        self.enc_mode = enc_mode
        self._count = 0  # saves submitted: the same sequence on every rank
        self._lock = threading.Lock()
        self._view: list[StepInfo] = []  # rank 0's listing, the same on every rank
        self._steps: list[int] = []  # submitted, not yet committed or failed
        self._inner: list[SaveHandle] = []  # the engine's handle of the last save

    def view(self) -> list[StepInfo]:
        """The committed steps as rank 0 last reported them (start, commit, retention, restore)."""
        with self._lock:
            return list(self._view)

    def in_flight(self) -> set[int]:
        """Steps submitted and not yet committed or failed (retention keeps them)."""
        with self._lock:
            return set(self._steps)

    def save(
        self, info: StepInfo, state: Any, work: BackgroundWork, after_commit: Callable[[], None]
    ) -> SaveHandle:
        """This rank's part of one step; the handle resolves once the step is listed (every rank).

        ``after_commit`` (rank 0: pointer and retention) runs on ``work``'s
        thread after the commit; its failure reaches every rank.
        """
        info = replace(info, layout=LAYOUT_SHARDED)
        tmp, n = self.begin(info.step)
        try:
            inner = self.submit(state, tmp, n)
        except BaseException:
            if not self.group.is_coordinator:  # rank 0's verdict must still be read
                work.put(lambda: self.finish(None, info, tmp, n))
            raise
        handle = SaveHandle(self.store.step_path(info.step))
        with self._lock:
            self._steps.append(info.step)
        work.track(handle)
        chain(inner.staged, handle.staged)
        work.put(lambda: self._complete(inner, handle, info, tmp, n, after_commit))
        return handle

    def _complete(
        self, inner: SaveHandle, handle: SaveHandle, info: StepInfo, tmp: str, n: int,
        after_commit: Callable[[], None],
    ) -> None:
        # The manager's thread, in save order: rank 0 publishes, every rank learns the verdict.
        try:
            committed = self.finish(inner, info, tmp, n)
        except BaseException as exc:
            if not handle.staged.done():
                handle.staged.set_exception(exc)
            handle.committed.set_exception(exc)
            return
        finally:
            with self._lock:
                self._steps.remove(info.step)
        with self._lock:  # listed from now on; retention below may drop older steps
            self._view = sorted(
                [i for i in self._view if i.step != committed.step] + [committed],
                key=lambda i: i.step,
            )
        handle.committed.set_result(handle.target)
        error = None
        if self.group.is_coordinator:
            try:
                after_commit()
            except BaseException as exc:  # noqa: BLE001 - told to every rank, then raised
                error = exc
        view = self.settle(n, error)
        with self._lock:
            self._view = view
        if error is not None:
            raise error

    def start(self) -> list[StepInfo]:
        """Rank 0 removes orphans and lists; every rank gets its token and listing (collective)."""
        payload = None
        if self.group.is_coordinator:
            try:
                with _in_flight_lock:
                    keep = set(_in_flight)
                self.store.remove_orphans(keep)  # nobody of this group is saving yet
                steps = [asdict(i) for i in self.store.committed()]
                payload = {"token": secrets.token_hex(6), "steps": steps}
            except BaseException as exc:  # every rank raises, not only rank 0
                payload = {"error": _describe(exc)}
        payload = self.group.broadcast(payload)
        if "error" in payload:
            raise CheckpointError(
                f"CheckpointManager: rank 0 could not prepare {self.store.location!r}: "
                f"{payload['error']}"
            )
        self.group.token = payload["token"]
        with self._lock:
            self._view = _as_infos(payload["steps"])
        return self.view()

    def begin(self, step: int) -> tuple[str, int]:
        """Number the next save (the same on every rank) and name its temp directory."""
        n = self._count
        self._count += 1
        tmp = self.store.sharded_target(step, self.group.token, n)
        with _in_flight_lock:
            _in_flight.add(tmp)
        return tmp, n

    def submit(self, state: Any, tmp: str, n: int) -> SaveHandle:
        """Start this rank's part of save ``n`` (returns once staged); a failure is raised.

        Rank 0 then tells the other ranks at once (their distributed vote would
        only time out); another rank's caller must still run :meth:`finish`
        with ``inner=None`` so that rank 0's verdict is read and deleted.
        """
        import torchaux.distributed as td

        remote = isinstance(self.store, RemoteStore)
        # The previous save's engine handle is observed here, on the caller's
        # thread: the engine's next reserve() would otherwise raise its failure
        # on whichever rank got there first (it waits for that save's slot anyway).
        for previous in self._inner:
            previous.exception()
        try:
            if remote and self.group.is_coordinator:
                self._unlist_replaced(tmp)
            inner = td.save_async(
                state, tmp, process_group=self.group.pg, enc_key=self.enc_key,
                enc_mode=self.enc_mode,
                storage_options=self.store.options if remote else None,  # type: ignore[union-attr]
            )
        except BaseException as exc:
            if self.group.is_coordinator:
                self._forget(tmp, remove=True)
                self.group.post(n, "verdict", {"ok": False, "error": _describe(exc)})
            raise
        self._inner = [inner]
        return inner

    def _unlist_replaced(self, tmp: str) -> None:
        """Rank 0, object store: a committed step being replaced (force) stops being listed.

        Its ``.metadata`` changes at the distributed commit, before the new
        marker: without this the old marker would list the new data meanwhile.
        """
        assert isinstance(self.store, RemoteStore)
        step = parse_step(tmp.rstrip("/").rsplit("/", 1)[-1])
        if step is not None and step in {i.step for i in self.view()}:
            self.store.unlist(step)

    def _forget(self, tmp: str, *, remove: bool) -> None:
        with _in_flight_lock:
            _in_flight.discard(tmp)
        if not remove:
            return
        if isinstance(self.store, RemoteStore):
            self.store.discard_sharded(tmp)  # unlisted: its prefix, marker-less, goes
        else:
            remove_tree(tmp)

    def finish(self, inner: SaveHandle | None, info: StepInfo, tmp: str, n: int) -> StepInfo:
        """Background thread: the step is committed when this returns rank 0's info (else raises).

        ``inner`` None: this rank failed to start (its caller saw why); only
        rank 0's verdict is read, so the store's keys are cleaned up.
        """
        timeout = float(_knobs.distributed_timeout_s())
        if not self.group.is_coordinator:
            try:
                verdict = self.group.fetch(n, "verdict", timeout)
            finally:
                self._forget(tmp, remove=False)
            if inner is None:
                return info
            # Rank 0's verdict is the truth; this rank's own outcome (perhaps still
            # voting, when rank 0 failed to start) is observed whenever it ends.
            local = inner.exception(0) if inner.done() else None
            inner.committed.add_done_callback(lambda done: done.exception())
            if not verdict["ok"]:
                raise CheckpointError(
                    f"step {info.step} was not saved: rank 0 reports {verdict['error']}"
                ) from local
            return StepInfo(**verdict["info"])  # rank 0's metrics are the step's
        assert inner is not None  # rank 0's failures to start were posted in submit
        try:
            inner.wait()
            self.store.publish_sharded(tmp, info)
        except BaseException as exc:
            self._forget(tmp, remove=True)  # only a temp directory: never listed
            self.group.post(n, "verdict", {"ok": False, "error": _describe(exc)})
            raise
        self._forget(tmp, remove=False)
        self.group.post(n, "verdict", {"ok": True, "info": asdict(info)})
        return info

    def settle(self, n: int, error: BaseException | None) -> list[StepInfo]:
        """After rank 0's retention for save ``n``: the committed listing on every rank.

        Rank 0 passes the failure of its pointer update or retention (it raises
        it itself); the other ranks raise it as a CheckpointError.
        """
        timeout = float(_knobs.distributed_timeout_s())
        if self.group.is_coordinator:
            try:
                steps = self.store.committed()
            except BaseException as exc:
                self.group.post(n, "settled", {"error": _describe(exc)})
                raise
            if error is not None:
                self.group.post(n, "settled", {"error": _describe(error)})
            else:
                self.group.post(n, "settled", {"steps": [asdict(i) for i in steps]})
            return steps
        doc = self.group.fetch(n, "settled", timeout)
        if "error" in doc:
            raise CheckpointError(
                f"CheckpointManager: rank 0 failed after committing save {n} (the latest "
                f"pointer or retention): {doc['error']}"
            )
        return _as_infos(doc["steps"])

    def choose_agreed(self, step: int | None, work: BackgroundWork) -> StepInfo:
        """Every rank: agree on ``restore(step)``, let this rank's saves finish, take rank 0's choice."""
        refused: BaseException | None = None
        try:
            if step is not None:
                check_step(step, "restore")
        except (TypeError, ValueError) as exc:
            refused = exc
        self.group.agree_call("restore", -1 if step is None else step, refused)
        work.drain()  # nothing of ours in flight: rank 0's listing is final until the next save
        info, listing = self.choose(step)
        with self._lock:
            self._view = listing
        return info

    def choose(self, step: int | None) -> tuple[StepInfo, list[StepInfo]]:
        """Rank 0's choice of the step to restore and its listing, on every rank (collective)."""
        payload = None
        if self.group.is_coordinator:
            try:
                committed = self.store.committed()
                by_step = {i.step: i for i in committed}
                chosen = committed[-1].step if step is None and committed else step
                if chosen is None or chosen not in by_step:
                    raise FileNotFoundError(
                        f"{self.store.location!r} holds no committed step "
                        f"{'to restore' if step is None else step}; committed: {sorted(by_step)}"
                    )
                payload = {"info": asdict(by_step[chosen]), "steps": [asdict(i) for i in committed]}
            except FileNotFoundError as exc:
                payload = {"missing": str(exc)}
            except BaseException as exc:  # every rank raises, not only rank 0
                payload = {"error": _describe(exc)}
        payload = self.group.broadcast(payload)
        if "missing" in payload:
            raise FileNotFoundError(payload["missing"])
        if "error" in payload:
            raise CheckpointError(f"CheckpointManager restore: rank 0 failed: {payload['error']}")
        return StepInfo(**payload["info"]), _as_infos(payload["steps"])


def load_sharded(
    path: str, info: StepInfo, state: Any, *, process_group: Any, dec_key: bytes | None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a distributed step: into ``state`` in place (resharding), or whole into one dict.

    ``path`` is the step's directory or URL prefix (``storage_options`` for a URL).
    """
    import torchaux.distributed as td

    if info.layout != LAYOUT_SHARDED:
        raise ValueError(f"step {info.step} is not a distributed step ({info.layout})")
    check_step(info.step, "restore")
    mode = info.encrypted or "AES-GCM"
    if info.encrypted is None:
        dec_key = None
    elif dec_key is None:
        raise ValueError(f"step {info.step} is encrypted ({info.encrypted}); pass enc_key")
    options = storage_options if storage_options else None
    if state is None:
        return td.load_full(path, dec_key=dec_key, dec_mode=mode, storage_options=options)
    if not isinstance(state, dict):
        raise TypeError(
            f"restore(state=...) of a distributed step needs a dict state; got {type(state).__name__}"
        )
    td.load(state, path, process_group=process_group, dec_key=dec_key, dec_mode=mode,
            storage_options=options)
    return state
