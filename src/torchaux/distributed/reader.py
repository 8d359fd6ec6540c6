"""``StorageReader``: DCP's reader interface, verifying and decrypting, never unpickling code.

Reads checkpoints written by :class:`~torchaux.distributed.StorageWriter` and
by stock DCP's ``FileSystemWriter`` (same layout, :mod:`.layout`).  Per chunk:
read its bytes, check the length and the checksum (when the checkpoint has
them), open the crypto envelope (when encrypted), then
``torch.load(weights_only=True)``.  ``.metadata`` is read with the allow-list
of :mod:`.metadata`.  DCP's load planner reshards: each rank reads only the
chunks that overlap its shards.

>>> import torch, torch.distributed.checkpoint as dcp, warnings
>>> from torchaux.distributed import StorageWriter
>>> d = os.path.join(doctest_tmp, "ck")
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     _ = dcp.save({"w": torch.ones(3), "step": 7}, storage_writer=StorageWriter(d))
...     out = {"w": torch.zeros(3), "step": 0}
...     dcp.load(out, storage_reader=StorageReader(d), planner=SafeLoadPlanner())
>>> out["w"].tolist(), out["step"]
([1.0, 1.0, 1.0], 7)
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader as _DcpStorageReader
from torch.futures import Future

from torchaux.checkpoint.formats.fill import THREAD_NAME_PREFIX, default_workers
from torchaux.checkpoint.storage.remote import is_url
from torchaux.distributed.checksums import checksum as compute_checksum
from torchaux.distributed.chunks import BufferFile, chunk_tensor, read_into
from torchaux.distributed.layout import ENCRYPTION_DESCRIPTOR, EXTRAS_KEY, FORMAT_VERSION
from torchaux.distributed.metadata import read_metadata
from torchaux.distributed.remote.access import locate
from torchaux.errors import DecryptionError, IntegrityError, UnsupportedFormatError

# Chunks from this size on are read straight into their destination (one copy
# instead of two); below it the layout parse costs more than the copy it saves.
_DIRECT_BYTES = 1 << 20

__all__ = ["StorageReader", "SafeLoadPlanner", "SafeFullLoadPlanner"]


def _load_bytes(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    # DefaultLoadPlanner.load_bytes uses torch.load(weights_only=False) (torch
    # 2.13 default_planner.py), which runs pickled code; values saved by DCP
    # (ints, floats, strings, containers, tensors) all pass weights_only.
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsupportedFormatError(
            f"the value of {fqn!r} is a pickled object that "
            f"weights_only loading refuses ({exc}); torchaux never unpickles code"
        ) from exc
    except (RuntimeError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError, struct.error) as exc:
        # Stock DCP files carry no checksums, so a damaged value reaches
        # torch.load, whose zip reader and weights-only unpickler fail in these
        # ways (tests/distributed/test_metadata_fuzz.py); torchaux's own files
        # fail their checksum before this point.
        raise IntegrityError(
            f"the value of {fqn!r} is damaged ({type(exc).__name__}: {exc}); the data "
            "file holding it is corrupt: restore it from a copy or load an older checkpoint"
        ) from exc
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner`` with non-tensor values loaded ``weights_only``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)


class SafeFullLoadPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the whole state dict from the metadata (like ``dcp_to_torch_save``), safely."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_bytes(self, read_item, value)


class StorageReader(_DcpStorageReader):
    """Reads DCP checkpoint directories (torchaux's or stock), verifying every chunk.

    Args:
        path: the checkpoint directory, or an fsspec URL prefix (``s3://bucket/ckpt``).
        dec_key: key of an encrypted checkpoint.
        dec_mode: the mode it was encrypted with (``"AES-GCM"`` by default).
        verify: check chunk checksums where the checkpoint has them.
        storage_options: fsspec options for a URL ``path``; chunks are then
            read with ranged GETs (:mod:`torchaux.distributed.remote.access`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dec_key: bytes | None = None,
        dec_mode: str = "AES-GCM",
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike; found {type(path).__name__}")
        if dec_key is not None:
            from torchaux.checkpoint.crypto import validate_key

            validate_key(dec_key, dec_mode)
        self.path, self.remote = locate(path, storage_options, "StorageReader")
        self.dec_key = dec_key
        self.dec_mode = dec_mode
        self.verify = verify
        self.storage_data: dict[Any, Any] = {}
        self.extras: dict[str, Any] | None = None
        self._metadata: Metadata | None = None
        self._scratch: dict[int, bytearray] = {}  # thread id -> its buffer

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        self.extras = None
        self._scratch = {}
        if checkpoint_id:
            target = os.fspath(checkpoint_id)
            # A new URL keeps this reader's storage_options; a local path takes none.
            options = self.remote.options if self.remote is not None and is_url(target) else None
            path, found = locate(target, options, "StorageReader")
            if path != self.path:
                self.path, self.remote, self._metadata = path, found, None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP's fallback to rank-local metadata (use_collectives=False saves),
            # which torchaux never writes.
            raise FileNotFoundError(f"{self.path}: no rank-local metadata (torchaux writes one .metadata)")
        if self._metadata is None:
            metadata = read_metadata(self.path) if self.remote is None else self.remote.read_metadata()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata  # read once: load() reads it first to raise our errors
        return self._metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise IntegrityError(f"{self.path}/.metadata has no chunk table (storage_data)")
        self.storage_data = {k: v for k, v in metadata.storage_data.items() if k != EXTRAS_KEY}
        self.extras = metadata.storage_data.get(EXTRAS_KEY)
        if self.extras is not None and self.extras.get("format_version", 0) > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{self.path} was written by a newer torchaux (extras format "
                f"{self.extras.get('format_version')}, this one reads {FORMAT_VERSION}); upgrade"
            )
        encryption = (self.extras or {}).get("encryption")
        if encryption is not None and self.dec_key is None:
            raise DecryptionError(
                f"{self.path} is encrypted ({encryption}); pass dec_key= (and dec_mode=) to load it"
            )

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    # -- reading ---------------------------------------------------------------

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan``: one data file per thread (local files), each in offset order.

        A resharded load reads several ranks' files (2 -> 1: two); one
        thread reading and hashing one file after the other left the second
        core idle, and the load came out 1.03-1.05x ``dcp.load``'s (``torchaux
        bench --distributed``, 2026-12-07).  The planner is called under one
        lock; copies, reads and checksums run unlocked.
        """
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[self.storage_data[item.storage_index].relative_path].append(item)
        lock = threading.Lock()
        workers = 1 if self.remote is not None else min(len(per_file), default_workers())
        if workers <= 1:
            for relative, items in per_file.items():
                self._read_file(relative, items, planner, lock)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix=THREAD_NAME_PREFIX) as pool:
                futures = [pool.submit(self._read_file, relative, items, planner, lock)
                           for relative, items in per_file.items()]
                wait(futures)
            # The pool's threads are gone: their scratch buffers go too (a long-lived
            # reader must not keep one per thread that ever read for it).
            self._scratch = {k: v for k, v in self._scratch.items() if k == threading.get_ident()}
            for f in futures:  # the first failure in file order, after every file is done
                f.result()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_file(self, relative: str, items: list[ReadItem], planner: LoadPlanner,
                   lock: threading.Lock) -> None:
        if not relative or os.path.basename(relative) != relative or relative in (".", ".."):
            # Data files are plain names inside the checkpoint; a crafted .metadata
            # must not make a load read files elsewhere (``../x``, ``/etc/x``).
            raise IntegrityError(
                f"checkpoint {self.path}'s metadata names data file {relative!r}, which is not "
                "a plain file name inside the checkpoint directory: the metadata is damaged or "
                "crafted; do not load it"
            )
        path = os.path.join(self.path, relative)
        try:
            f = open(path, "rb", buffering=0) if self.remote is None else self.remote.open(relative)
        except FileNotFoundError:
            raise IntegrityError(
                f"data file {relative} of checkpoint {self.path} is missing (it holds "
                f"{items[0].storage_index.fqn!r} and more): the checkpoint is incomplete"
            ) from None
        cache: dict[Any, Any] = {}
        with f:
            items = sorted(items, key=lambda it: self.storage_data[it.storage_index].offset)
            for item in items:
                key = (item.storage_index.fqn, tuple(item.storage_index.offset or ()))
                if key not in cache and item.type != LoadItemType.BYTE_IO and self._read_direct(
                    f, relative, item, planner, lock
                ):
                    continue
                if key not in cache:
                    cache = {key: self._read_chunk(f, relative, item)}  # keep one decoded chunk
                value = cache[key]
                if item.type == LoadItemType.BYTE_IO:
                    with lock:
                        planner.load_bytes(item, io.BytesIO(value))
                else:
                    self._commit_tensor(value, item, planner, lock)

    def _read_direct(self, f: Any, relative: str, item: ReadItem, planner: LoadPlanner,
                     lock: threading.Lock) -> bool:
        """A big plain chunk that fills a contiguous destination: read straight into it."""
        info = self.storage_data[item.storage_index]
        if info.transform_descriptors or info.length < _DIRECT_BYTES or self.remote is not None:
            return False
        with lock:
            target = planner.resolve_tensor(item).detach()
        from torch.distributed._shard._utils import narrow_tensor_by_index

        dest = narrow_tensor_by_index(target, item.dest_offsets, item.lengths)
        expected = None
        algorithm = None
        if self.verify and self.extras is not None:
            entry = self.extras["files"].get(relative)
            expected = None if entry is None else entry["checksums"].get(info.offset)
            if expected is None:
                return False  # the general path names the missing checksum
            algorithm = self.extras["checksum"]
        if any(item.storage_offsets):
            return False
        try:
            got = read_into(f.fileno(), info.offset, info.length, dest, algorithm)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
            return False  # anything unusual: the general path reads it (and names the problem)
        if got is None:
            return False
        if algorithm is not None and got != expected:
            raise IntegrityError(
                f"checksum mismatch in data file {relative} for {item.storage_index.fqn!r} "
                f"(chunk at offset {info.offset}, {info.length} bytes): the file is corrupt; "
                "the destination tensor holds the corrupt bytes"
            )
        with lock:
            planner.commit_tensor(item, target)
        return True

    def _scratch_for(self, n: int) -> memoryview:
        # One warm buffer per reading thread for the chunk bytes: a fresh 32 MiB
        # bytes object per chunk pays its page faults on every read.
        mine = self._scratch.get(threading.get_ident(), bytearray())
        if len(mine) < n:
            mine = self._scratch[threading.get_ident()] = bytearray(n)
        return memoryview(mine)[:n]

    def _read_chunk(self, f: Any, relative: str, item: ReadItem) -> Any:
        info = self.storage_data[item.storage_index]
        fqn = item.storage_index.fqn
        raw = self._scratch_for(info.length)
        f.seek(info.offset)
        got = 0
        while got < info.length:
            n = f.readinto(raw[got:])  # unbuffered FileIO: straight into the buffer
            if not n:
                break
            got += n
        if got != info.length:
            raise IntegrityError(
                f"data file {relative} is truncated: chunk of {fqn!r} needs bytes "
                f"[{info.offset}, {info.offset + info.length}), the file has {info.offset + got}"
            )
        if self.verify and self.extras is not None:
            entry = self.extras["files"].get(relative)
            expected = None if entry is None else entry["checksums"].get(info.offset)
            if expected is None:
                raise IntegrityError(
                    f"{self.path}/.metadata has no checksum for the chunk of {fqn!r} in {relative}"
                )
            if compute_checksum(raw, self.extras["checksum"]) != expected:
                raise IntegrityError(
                    f"checksum mismatch in data file {relative} for {fqn!r} (chunk at offset "
                    f"{info.offset}, {info.length} bytes): the file is corrupt"
                )
        data = raw
        if ENCRYPTION_DESCRIPTOR in (info.transform_descriptors or ()):
            data = self._decrypt(raw, relative, fqn)
        elif info.transform_descriptors:
            raise UnsupportedFormatError(
                f"chunk of {fqn!r} in {relative} uses stream extensions "
                f"{list(info.transform_descriptors)} that torchaux does not read"
            )
        if item.type == LoadItemType.BYTE_IO:
            return bytes(data)
        try:
            return chunk_tensor(data)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file and tensor named
            raise IntegrityError(
                f"chunk of {fqn!r} in data file {relative} does not load: {exc}"
            ) from exc

    def _decrypt(self, raw: memoryview, relative: str, fqn: str) -> memoryview:
        from torchaux.checkpoint.crypto import decrypt_stream

        assert self.dec_key is not None  # set_up_storage_reader checked
        out = io.BytesIO()
        try:
            decrypt_stream(BufferFile(raw), out, self.dec_key, self.dec_mode)
        except DecryptionError as exc:
            raise DecryptionError(f"{relative}, chunk of {fqn!r}: {exc}") from exc
        return out.getbuffer()

    @staticmethod
    def _commit_tensor(tensor: torch.Tensor, item: ReadItem, planner: LoadPlanner,
                       lock: threading.Lock) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        piece = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        with lock:
            target = planner.resolve_tensor(item).detach()
        if target.size() != piece.size():
            raise IntegrityError(
                f"chunk of {item.storage_index.fqn!r} has shape {tuple(piece.size())}, the "
                f"destination expects {tuple(target.size())}: the metadata does not match the data"
            )
        target.copy_(piece)
        with lock:
            planner.commit_tensor(item, target)
