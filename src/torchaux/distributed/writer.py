"""``StorageWriter``: DCP's writer interface on the torchaux engine.

``dcp.save``/``dcp.async_save`` drive it (torch 2.13 state_dict_saver.py
``_save_state_dict``): ``set_up_storage_writer`` and ``prepare_local_plan`` on
every rank, ``prepare_global_plan`` on the coordinator (which picks a fresh
*generation* for the save), ``write_data`` on every rank, ``finish`` on the
coordinator once every rank's ``write_data`` returned.

``write_data`` writes the rank's chunks into one file in the generation's
staging folder with :func:`~torchaux.checkpoint.storage.commit.atomic_write`
(``O_DIRECT`` where possible, fsynced), hashing each chunk and, with a key,
sealing each chunk in the crypto envelope.  ``finish`` hands the results to
:func:`torchaux.distributed.commit.publish`: files moved into place under new
names, ``.metadata`` committed atomically, the previous generation removed.
The layout is in :mod:`torchaux.distributed.layout`.

On an fsspec URL (``s3://bucket/prefix``, with ``storage_options``) each rank
streams its chunks into a multipart upload of its data object under its final,
generation-unique name (:func:`torchaux.checkpoint.storage.remote.upload`:
bounded part buffers, the object appears only when complete), and ``finish``
PUTs ``.metadata`` last (:func:`torchaux.distributed.remote.commit.publish_remote`).

>>> import torch, torch.distributed.checkpoint as dcp, warnings
>>> d = os.path.join(doctest_tmp, "ck")
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized"
...     _ = dcp.save({"w": torch.arange(4.0)}, storage_writer=StorageWriter(d))
...     out = {"w": torch.zeros(4)}
...     dcp.load(out, checkpoint_id=d)  # stock FileSystemReader
>>> out["w"].tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import secrets
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter as _DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.storage.publish import make_staging_dir
from torchaux.distributed import in_place
from torchaux.distributed.checksums import HashingWriter, default_algorithm
from torchaux.checkpoint.storage import remote
from torchaux.distributed.commit import publish
from torchaux.distributed.layout import ENCRYPTION_DESCRIPTOR, EXTRAS_KEY, data_file_name
from torchaux.distributed.remote.access import locate

__all__ = ["StorageWriter"]


def _check_key(enc_key: object, enc_mode: object) -> None:
    if enc_key is None:
        return
    from torchaux.checkpoint.crypto import validate_key

    validate_key(enc_key, enc_mode)  # TypeError/ValueError naming the expected lengths


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    # torch.save's zip CRC-32 of every record cost 15 ms per 32 MiB chunk with
    # the GIL held (python -c timing torch.save of a 32 MiB tensor into a null
    # writer, 2-core VM, 2026-12-02: 15.2 ms with the CRC, 0.14 ms without); the
    # chunk checksum in the metadata covers the same bytes.  torch.load never
    # checks the zip CRC, so stock readers read the chunk all the same.  The
    # setting is per thread in torch 2.13 (formats/torch_save/writer.py).
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class StorageWriter(_DcpStorageWriter):
    """Writes DCP checkpoints that commit atomically, with per-chunk checksums.

    Args:
        path: the checkpoint directory (created if missing; its parent must
            exist), or an fsspec URL prefix such as ``s3://bucket/run/step-100``
            (its bucket must exist).
        enc_key: encrypt every chunk with this key (16/24/32 bytes); ``None``: plaintext.
        enc_mode: ``"AES-GCM"`` (default), ``"AES-CBC"`` or ``"SM4-CBC"``.
        checksum: ``"xxh3-64"`` or ``"crc32"``; default: xxh3-64 where the
            ``xxhash`` package is installed (:mod:`torchaux.distributed.checksums`).
        storage_options: fsspec options for a URL ``path`` (e.g.
            ``{"client_kwargs": {"endpoint_url": ...}}``); refused with a local path.

    Picklable, so ``async_checkpointer_type=PROCESS`` can ship it to DCP's
    checkpoint process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
        checksum: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike; found {type(path).__name__}")
        _check_key(enc_key, enc_mode)
        self.path, self.remote = locate(path, storage_options, "StorageWriter")
        if self.remote is not None:
            self.remote.check_bucket("torchaux.distributed save")
        else:
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                raise ValueError(
                    f"the parent directory {parent!r} of checkpoint {self.path!r} does not "
                    "exist; create it first"
                )
        self.enc_key = enc_key
        self.enc_mode = enc_mode
        self.checksum = checksum or default_algorithm()
        if checksum is not None:
            HashingWriter(io.BytesIO(), self.checksum)  # unknown algorithm: raise now
        self.save_id = secrets.token_hex(8)
        self.rank = 0
        self.is_coordinator = True
        self.generation: str | None = None
        self.uploaded: list[str] = []  # data objects this rank uploaded for the current save

    # -- DCP interface --------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            target = os.fspath(checkpoint_id)
            # A new URL keeps this writer's storage_options; a local path takes none.
            options = self.remote.options if self.remote is not None and remote.is_url(target) else None
            self.path, self.remote = locate(target, options, "StorageWriter")
        self.save_id = secrets.token_hex(8)
        self.generation = None
        self.uploaded = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if kwargs.get("use_collectives", True) is False:
            raise ValueError(
                "torchaux.distributed.StorageWriter commits through the coordinator; "
                "use_collectives=False (no coordinator) is not supported"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.remote is None:  # an object store has no folders to make
            os.makedirs(self.path, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # A fresh generation per save: new file names, so the committed
        # checkpoint's files are never rewritten (layout.py).
        self.generation = secrets.token_hex(6)
        return [
            dataclasses.replace(plan, storage_data={"rank": i, "generation": self.generation})
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        if not isinstance(info, dict) or "generation" not in info:
            raise ValueError(
                "the save plan was not prepared by torchaux's StorageWriter.prepare_global_plan; "
                "use the same writer class on every rank"
            )
        results = self._write_rank_file(plan, planner, int(info["rank"]), str(info["generation"]))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        generation = self.generation
        if generation is None:
            raise RuntimeError("finish() called before prepare_global_plan() on the coordinator")
        if self.remote is not None:
            from torchaux.distributed.remote.commit import publish_remote

            publish_remote(
                self.remote, generation, metadata, results, storage_meta=self.storage_meta(),
                checksum=self.checksum,
                encryption=self.enc_mode if self.enc_key is not None else None,
            )
            return
        publish(
            self.path,
            generation,
            metadata,
            results,
            storage_meta=self.storage_meta(),
            checksum=self.checksum,
            encryption=self.enc_mode if self.enc_key is not None else None,
        )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint directory (or URL)."""
        return self.path

    def discard_failed(self) -> list[str]:
        """After this save failed: remove what this rank uploaded for it (object stores).

        On a local disk the staged file is inside the generation's staging
        folder, which the next commit removes.  On an object store the rank's
        completed data object is deleted unless the committed ``.metadata``
        references it (:func:`torchaux.distributed.remote.commit.discard_objects`).

        Returns:
            The objects deleted.
        """
        names, self.uploaded = self.uploaded, []
        if self.remote is None or not names:
            return []
        from torchaux.distributed.remote.commit import discard_objects

        return discard_objects(self.remote, names)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    # -- writing -------------------------------------------------------------

    def _write_rank_file(
        self, plan: SavePlan, planner: SavePlanner, rank: int, generation: str
    ) -> list[WriteResult]:
        name = data_file_name(rank, 0, generation)
        descriptors = [ENCRYPTION_DESCRIPTOR] if self.enc_key is not None else None
        results: list[WriteResult] = []
        checksums: dict[int, int] = {}
        # Byte items first, then tensors, as FileSystemWriter orders them.
        items = sorted(plan.items, key=lambda it: it.type != WriteItemType.BYTE_IO)
        sink: Any
        if self.remote is not None:  # final name at once: the object appears only when complete
            sink = remote.upload(self.remote.object_url(name), self.remote.options)
        else:
            staging = make_staging_dir(self.path, generation)
            mode = 0o600 if self.enc_key is not None else None
            sink = atomic_write(os.path.join(staging, name), mode=mode)
        with sink as f:
            out = HashingWriter(f, self.checksum)
            for item in items:
                data = planner.resolve_data(item)
                direct = self.enc_key is None and in_place.eligible(out, data)
                if direct:
                    in_place.pad_for(out, data)  # type: ignore[arg-type]
                start = out.tell()
                if direct:
                    with _without_zip_crc():
                        in_place.write_in_place(out, data)  # type: ignore[arg-type]
                else:
                    self._write_chunk(out, data)
                length = out.tell() - start
                checksums[start] = out.digest_and_reset()
                results.append(
                    WriteResult(item.index, length, _StorageInfo(name, start, length, descriptors))
                )
        if self.remote is not None:
            self.uploaded.append(name)
        # The checksums travel to the coordinator as one extra result that
        # finish() moves out of the chunk table (commit.publish).
        extras = {"file": name, "rank": rank, "checksums": checksums}
        results.append(WriteResult(MetadataIndex(f"{EXTRAS_KEY}/{rank}"), 0, extras))
        return results

    def _write_chunk(self, out: HashingWriter, data: io.BytesIO | torch.Tensor) -> None:
        target: Any = out
        sealer = None
        if self.enc_key is not None:
            from torchaux.checkpoint.crypto import EncryptingWriter

            sealer = EncryptingWriter(out, self.enc_key, self.enc_mode)  # type: ignore[arg-type]
            target = sealer
        try:
            if isinstance(data, io.BytesIO):
                target.write(data.getbuffer())
            else:
                tensor = data.detach()
                if tensor.device.type != "cpu":
                    tensor = tensor.cpu()
                if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                    # torch.save writes a view's whole storage; keep only the chunk.
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                with _without_zip_crc():
                    torch.save(tensor, target)
            if sealer is not None:
                sealer.finish()
        except BaseException:
            if sealer is not None:
                sealer.abort()
            raise
