"""The commit of a distributed checkpoint: publish on the coordinator, after a vote.

:func:`publish` runs on the coordinator once every rank has written its file
into the generation's staging folder:

1. the staged files move into the checkpoint directory under their new
   generation's names, and the directory is fsynced
   (:func:`~torchaux.checkpoint.storage.publish.publish_files`);
2. ``.metadata`` is written with
   :func:`~torchaux.checkpoint.storage.commit.atomic_write` (temp, fsync,
   ``os.replace``, directory fsync): **this rename is the commit**; before it
   the old ``.metadata`` still points at the old, untouched files;
3. files of older generations and staging folders of failed saves are removed.

Unlike DCP's ``FileSystemWriter.finish`` (delete the old ``.metadata``, then
rename: a window with no checkpoint; no directory fsync; data rewritten in
place under the old index), no instant shows a torn checkpoint.

:class:`StoreVote` is the cross-rank coordination of
:func:`torchaux.distributed.save_async`: plans, results and the outcome pass
through the process group's key-value store with deadlines, never through a
collective, so a dead rank makes the others fail within the timeout instead
of hanging until the process group's watchdog.

On an object store (``s3://``) the commit is
:func:`torchaux.distributed.remote.commit.publish_remote` instead (no rename:
the ranks upload under the generation's names directly, ``.metadata`` is PUT
last); the vote is the same.
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any

from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.storage import WriteResult

from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.storage.publish import STAGING_PREFIX, publish_files, remove_unreferenced
from torchaux.distributed.layout import DATA_SUFFIX, EXTRAS_KEY, FORMAT_VERSION
from torchaux.distributed.metadata import metadata_path
from torchaux.errors import CheckpointError

__all__ = ["publish", "complete_metadata", "StoreVote"]


def _split_results(
    results: list[list[WriteResult]],
) -> tuple[dict[Any, Any], dict[str, dict[str, Any]]]:
    chunks: dict[Any, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    for per_rank in results:
        for wr in per_rank:
            if wr.index.fqn.startswith(EXTRAS_KEY + "/"):
                files[wr.storage_data["file"]] = wr.storage_data
            else:
                chunks[wr.index] = wr.storage_data
    return chunks, files


def complete_metadata(
    metadata: Metadata,
    generation: str,
    results: list[list[WriteResult]],
    *,
    storage_meta: StorageMeta | None,
    checksum: str,
    encryption: str | None,
) -> set[str]:
    """Fill ``metadata``'s chunk table and torchaux extras from the ranks' results.

    Returns:
        The names of the data files the completed metadata references.
    """
    from torchaux import __version__

    chunks, files = _split_results(results)
    chunks[EXTRAS_KEY] = {
        "format_version": FORMAT_VERSION,
        "torchaux_version": __version__,
        "generation": generation,
        "checksum": checksum,
        "encryption": encryption,
        "files": {name: {"rank": f["rank"], "checksums": dict(f["checksums"])}
                  for name, f in files.items()},
    }
    metadata.storage_data = chunks
    metadata.storage_meta = storage_meta
    metadata.version = CURRENT_DCP_VERSION
    return set(files)


def publish(
    checkpoint_dir: str,
    generation: str,
    metadata: Metadata,
    results: list[list[WriteResult]],
    *,
    storage_meta: StorageMeta | None,
    checksum: str,
    encryption: str | None,
) -> None:
    """Commit ``generation`` in ``checkpoint_dir`` (coordinator only; see the module doc)."""
    files = complete_metadata(metadata, generation, results, storage_meta=storage_meta,
                              checksum=checksum, encryption=encryption)
    staging = f"{checkpoint_dir}/{STAGING_PREFIX}{generation}"
    publish_files(staging, checkpoint_dir, sorted(files))
    with atomic_write(metadata_path(checkpoint_dir)) as f:
        pickle.dump(metadata, f)
    remove_unreferenced(checkpoint_dir, keep=files, data_suffix=DATA_SUFFIX)


_FAIL = b"\x00torchaux-fail\x00"


class _GuardedStore:
    """The store, with every failure to reach it turned into a CheckpointError.

    The store's server lives in one rank (usually rank 0); when that rank dies,
    ``set``/``get`` raise ``DistNetworkError`` on the survivors.
    """

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def guarded(*args: Any) -> Any:
            try:
                return method(*args)
            except Exception as exc:  # noqa: BLE001 - re-raised as a CheckpointError
                raise CheckpointError(
                    f"distributed checkpoint: the store became unreachable ({exc}); the rank "
                    "hosting it (usually rank 0) may have died; nothing was committed"
                ) from exc

        return guarded


class StoreVote:
    """Gather, scatter and agree through a ``torch.distributed.Store`` with deadlines.

    Every rank of one save uses the same ``prefix``.  A rank posts either its
    payload or a failure; the coordinator waits for all of them until the
    deadline and names the ranks that failed (with their cause) or never
    answered.  Keys are deleted once read.
    """

    def __init__(
        self, store: Any, prefix: str, rank: int, world: int, ranks: list[int], deadline: float
    ) -> None:
        self._raw_store = store
        self.store = _GuardedStore(store)
        self.prefix = prefix
        self.rank = rank
        self.world = world
        self.ranks = ranks  # global rank of each group rank, for messages
        self.deadline = deadline

    def _key(self, phase: str, rank: int) -> str:
        return f"{self.prefix}/{phase}/{rank}"

    def _remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def post(self, phase: str, payload: Any) -> None:
        """Post this rank's ``payload`` for ``phase``."""
        self.store.set(self._key(phase, self.rank), pickle.dumps(payload))

    def post_failure(self, phase: str, exc: BaseException) -> None:
        """Post that this rank failed in ``phase`` (so nobody waits for the timeout)."""
        self.store.set(self._key(phase, self.rank), _FAIL + repr(exc).encode()[:2000])

    def _wait(self, keys: list[str], what: str, owners: list[int] | None = None) -> None:
        try:
            self._raw_store.wait(keys, timedelta(seconds=self._remaining()))
        except Exception as exc:  # noqa: BLE001 - re-raised as a CheckpointError below
            if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                raise CheckpointError(
                    f"distributed checkpoint: the store became unreachable while waiting for "
                    f"{what} ({exc}); the rank hosting it (usually rank 0) may have died; "
                    "nothing was committed"
                ) from exc
            if owners is None:
                owners = [int(k.rsplit("/", 1)[1]) for k in keys if not self._check(k)]
            raise CheckpointError(
                f"distributed checkpoint: timed out waiting for {what}: no answer from "
                f"{self._names(owners)} (dead or hung); nothing was committed"
            ) from exc

    def _check(self, key: str) -> bool:
        try:
            return bool(self._raw_store.check([key]))
        except Exception:  # noqa: BLE001 - an unreachable store means "no answer"
            return False

    def _names(self, group_ranks: list[int]) -> str:
        ranks = [self.ranks[r] for r in group_ranks]
        return "rank " + ", ".join(str(r) for r in ranks) if ranks else "no rank"

    def gather(self, phase: str) -> list[Any]:
        """Coordinator: every rank's payload for ``phase``; raise naming failed or silent ranks."""
        keys = [self._key(phase, r) for r in range(self.world)]
        self._wait(keys, f"phase {phase!r} of every rank")
        payloads, failures = [], []
        for r, key in enumerate(keys):
            raw = self.store.get(key)
            self.store.delete_key(key)
            if raw.startswith(_FAIL):
                failures.append(f"rank {self.ranks[r]}: {raw[len(_FAIL):].decode(errors='replace')}")
                payloads.append(None)
            else:
                payloads.append(pickle.loads(raw))
        if failures:
            raise CheckpointError(
                f"distributed checkpoint: {len(failures)} rank(s) failed in phase {phase!r}; "
                "nothing was committed: " + "; ".join(failures)
            )
        return payloads

    def scatter(self, phase: str, payloads: list[Any]) -> None:
        """Coordinator: post ``payloads[r]`` for rank ``r``."""
        for r, payload in enumerate(payloads):
            if r == self.rank:
                continue
            self.store.set(self._key(phase, r), pickle.dumps(payload))

    def scatter_failure(self, phase: str, exc: BaseException) -> None:
        """Coordinator: tell every rank that ``phase`` failed, with the cause."""
        for r in range(self.world):
            if r == self.rank:
                continue
            self.store.set(self._key(phase, r), _FAIL + str(exc).encode()[:4000])

    def receive(self, phase: str) -> Any:
        """Non-coordinator: this rank's payload for ``phase`` from the coordinator."""
        key = self._key(phase, self.rank)
        self._wait([key], f"phase {phase!r} from the coordinator", owners=[0])
        raw = self.store.get(key)
        self.store.delete_key(key)
        if raw.startswith(_FAIL):
            raise CheckpointError(raw[len(_FAIL):].decode(errors="replace"))
        return pickle.loads(raw)
