"""The commit of a distributed checkpoint on an object store (``s3://``): ``.metadata`` last.

An object store has no rename; an object appears, whole, only when its
``PutObject`` or ``CompleteMultipartUpload`` succeeds
(:mod:`torchaux.checkpoint.storage.remote`).  So, with the same vote as on
disk (:class:`~torchaux.distributed.commit.StoreVote`):

1. every rank uploads its data object under its generation's name
   (``__<rank>_0_<generation>.distcp``, :mod:`.layout`) directly into the
   checkpoint's prefix: a name no committed ``.metadata`` references, so an
   old checkpoint never sees a new object, and a half-uploaded object is not
   there at all;
2. after every rank's upload completed (the vote), the coordinator checks the
   objects are listed and PUTs ``.metadata`` (:func:`publish_remote`): **this
   PUT is the commit**; S3 replaces the previous ``.metadata`` atomically;
3. it then deletes the data objects the new ``.metadata`` does not reference
   (older generations, saves that failed or were killed) and aborts the
   multipart uploads left directly under the prefix (killed ranks' parts).

A failed save leaves the previous ``.metadata`` and its objects untouched;
each rank removes the object it uploaded for it (:func:`discard_objects`),
unless the committed ``.metadata`` references it (a commit whose answer was
lost is still a commit).  What a killed save left is removed by step 3 of the
next one.
"""

from __future__ import annotations

import pickle
from collections.abc import Collection

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.storage import WriteResult

from torchaux.checkpoint.storage import remote
from torchaux.distributed.commit import complete_metadata
from torchaux.distributed.layout import DATA_SUFFIX, EXTRAS_KEY, METADATA_NAME
from torchaux.distributed.remote.access import RemoteDir
from torchaux.errors import CheckpointError

__all__ = ["publish_remote", "remove_unreferenced_objects", "discard_objects", "referenced_files"]


def publish_remote(
    directory: RemoteDir,
    generation: str,
    metadata: Metadata,
    results: list[list[WriteResult]],
    *,
    storage_meta: StorageMeta | None,
    checksum: str,
    encryption: str | None,
) -> None:
    """Commit ``generation`` under ``directory`` (coordinator only; see the module doc).

    Raises:
        CheckpointError: a data object the ranks reported is not listed
            (nothing is committed then).
    """
    files = complete_metadata(metadata, generation, results, storage_meta=storage_meta,
                              checksum=checksum, encryption=encryption)
    listed = directory.sizes()
    missing = sorted(files - set(listed))
    if missing:
        raise CheckpointError(
            f"distributed checkpoint {directory.url}: the ranks reported data objects "
            f"{missing} uploaded, but the store does not list them; nothing was committed"
        )
    with remote.upload(directory.object_url(METADATA_NAME), directory.options) as f:
        pickle.dump(metadata, f)
    remove_unreferenced_objects(directory, keep=files, listed=listed)


def remove_unreferenced_objects(
    directory: RemoteDir, *, keep: Collection[str], listed: Collection[str] | None = None
) -> list[str]:
    """Delete data objects not in ``keep`` and abort unfinished uploads directly under the prefix.

    Only ``*.distcp`` objects and uploads directly under the prefix count
    (never ``.metadata``, never deeper keys: another checkpoint may live
    under ``<prefix>/sub/``).  Call only when no save of this checkpoint is
    uploading (the coordinator after the vote: every rank has finished).

    Returns:
        The objects deleted and the uploads aborted (``bucket/key``).
    """
    fs, root = directory.filesystem()
    names = directory.sizes() if listed is None else listed
    doomed = [f"{root}/{n}" for n in sorted(names) if n.endswith(DATA_SUFFIX) and n not in keep]
    if doomed:
        fs.rm(doomed)
    _, key_prefix, _ = fs.split_path(f"{root}/")
    aborted = remote.abort_uploads(
        fs, f"{root}/", keep=lambda key: "/" in key[len(key_prefix):]
    )
    fs.invalidate_cache(root)
    return doomed + aborted


def referenced_files(metadata: Metadata) -> set[str]:
    """The data files a checkpoint's metadata points at."""
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    return {info.relative_path for key, info in storage.items()
            if key != EXTRAS_KEY and hasattr(info, "relative_path")}


def discard_objects(directory: RemoteDir, names: Collection[str]) -> list[str]:
    """A failed save: delete this rank's uploaded ``names`` that the committed ``.metadata`` does not use.

    Returns:
        The objects deleted.

    Raises:
        IntegrityError, UnsupportedFormatError: the committed ``.metadata``
            cannot be read; nothing is deleted then.
    """
    if not names:
        return []
    try:
        used = referenced_files(directory.read_metadata(check_sizes=False))
    except FileNotFoundError:
        used = set()  # no checkpoint committed yet
    fs, root = directory.filesystem()
    doomed = [f"{root}/{n}" for n in sorted(names) if n not in used]
    if doomed:
        fs.rm(doomed)
        fs.invalidate_cache(root)
    return doomed

