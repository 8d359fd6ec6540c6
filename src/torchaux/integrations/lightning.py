"""A Lightning ``CheckpointIO`` on the torchaux engine: ``Trainer(plugins=[TorchauxCheckpointIO()])``.

Works with ``lightning`` and ``pytorch_lightning`` (whichever is installed; the
class is registered with both ``CheckpointIO`` bases) and with Fabric
(``Fabric(plugins=[TorchauxCheckpointIO()])``).  What it changes against
Lightning's own ``AsyncCheckpointIO`` (ecosystem-anchors.md §1):

* the snapshot is one copy into warm host buffers on the calling thread
  (:func:`torchaux.save_async`), never a clone on the accelerator (#21630);
* ``load_checkpoint`` and ``remove_checkpoint`` first wait for a pending save of
  the same path (gcs-connector PR #138), and every hook that touches
  checkpoints (save, load, remove, teardown) raises a background failure that
  nobody has seen yet, instead of only the next save;
* ``on_committed(path)`` runs once the file is durable: the "save finished"
  hook Lightning lacks (#19414);
* ``s3://`` URLs (``dirpath="s3://bucket/run"``) are written with one atomic
  multipart upload (:mod:`torchaux.checkpoint.storage.remote`); fsspec
  ``storage_options`` come per call or once, ``TorchauxCheckpointIO(storage_options=...)``;
* files are ordinary Lightning checkpoints (byte-for-byte torch.save, written
  atomically), so ``Trainer.fit(ckpt_path=...)`` and ``load_from_checkpoint``
  read them without torchaux (unless ``enc_key`` or ``crc_check`` is given).
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.serialization import DEFAULT_PROTOCOL

from torchaux.checkpoint.api import save_async
from torchaux.checkpoint.engine import staging
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.storage import remote
from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.storage.directory import remove_tree

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _Base
except ImportError:
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO as _Base
    except ImportError:
        raise ImportError(
            "torchaux.integrations.lightning needs Lightning: pip install 'torchaux[lightning]' "
            "(or install 'lightning' or 'pytorch-lightning' yourself)"
        ) from None

__all__ = ["TorchauxCheckpointIO"]


def _cpu(storage: Any, location: str) -> Any:
    # Lightning's TorchCheckpointIO default (torch_io.py): keep storages on the CPU.
    return storage


class TorchauxCheckpointIO(_Base):  # type: ignore[misc,valid-type]
    """Non-blocking, atomic Lightning checkpoints.

    Args:
        async_save: ``True``: ``save_checkpoint`` returns once the state is
            copied to host buffers; ``False``: it returns once the file is durable.
        enc_key: encrypt files at rest (AES: 16/24/32 bytes; SM4: 16); read
            them back with this plugin (or ``torchaux.load_checkpoint``).
        enc_mode: ``"AES-GCM"``, ``"AES-CBC"`` or ``"SM4-CBC"``.
        crc_check: record a content CRC that ``load_checkpoint`` verifies.
        on_committed: called as ``on_committed(path)`` on the writer thread
            once a file is durable (written, fsynced, renamed into place); an
            exception it raises is re-raised at the next checkpoint hook.
        saver: the :class:`torchaux.AsyncSaver` to write with (default: one of
            its own, holding one save in flight).
        storage_options: fsspec options for ``s3://`` paths when a call gives
            none (``ModelCheckpoint`` never does), e.g. ``{"client_kwargs":
            {"endpoint_url": ...}}``; needs ``torchaux[s3]``.

    Example:
        >>> import os, torch
        >>> io = TorchauxCheckpointIO()
        >>> path = os.path.join(doctest_tmp, "epoch=0.ckpt")
        >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, path)
        >>> io.load_checkpoint(path)["state_dict"]["w"]  # waits for the pending save
        tensor([1., 1.])
        >>> io.teardown()
    """

    def __init__(
        self,
        *,
        async_save: bool = True,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
        crc_check: bool = False,
        on_committed: Callable[[str], object] | None = None,
        saver: AsyncSaver | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from torchaux.checkpoint.save import _check_encryption

        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be a bool, got {type(async_save).__name__}")
        if not isinstance(crc_check, bool):
            raise TypeError(f"crc_check must be a bool, got {type(crc_check).__name__}")
        if on_committed is not None and not callable(on_committed):
            raise TypeError(
                f"on_committed must be a callable taking the path, got {type(on_committed).__name__}"
            )
        if saver is not None and not isinstance(saver, AsyncSaver):
            raise TypeError(f"saver must be a torchaux.AsyncSaver or None, got {type(saver).__name__}")
        _check_encryption(enc_key, enc_mode)
        if storage_options is not None:
            remote.check_storage_options(storage_options, "s3://bucket/key")  # a dict of str keys
        super().__init__()
        self.storage_options = storage_options
        self.async_save = async_save
        self.enc_key = enc_key
        self.enc_mode = enc_mode
        self.crc_check = crc_check
        self.on_committed = on_committed
        self._saver = saver
        self._lock = threading.Lock()
        self._pending: dict[str, SaveHandle] = {}
        self._handles: list[SaveHandle] = []
        # Set once a save's on_committed has run: a Future wakes its waiters
        # before it runs its done-callbacks, so waiting on it alone is not enough.
        self._settled: dict[SaveHandle, threading.Event] = {}
        self._callback_errors: list[BaseException] = []

    def __repr__(self) -> str:  # never shows the key
        key = "None" if self.enc_key is None else f"<{8 * len(self.enc_key)}-bit key hidden>"
        return (
            f"TorchauxCheckpointIO(async_save={self.async_save}, enc_key={key}, "
            f"enc_mode={self.enc_mode!r}, crc_check={self.crc_check})"
        )

    # -- Lightning's CheckpointIO interface --------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Snapshot ``checkpoint`` now and write it to ``path`` in the background.

        Raises:
            TypeError: ``checkpoint`` is not a dict, or ``storage_options`` was
                given for a local path (as Lightning's ``TorchCheckpointIO``).
            ValueError: ``path`` is a URL of a store other than S3.
            Exception: an earlier save's (or ``on_committed``'s) failure.
        """
        if not isinstance(checkpoint, dict):
            raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
        target, options = self._target(path, storage_options)
        self._raise_failures()
        if not remote.is_url(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        saver = self._get_saver()
        try:
            handle = self._submit(saver, checkpoint, target, options)
        except BaseException as exc:
            # The saver re-raises an unobserved earlier failure here; it now counts as reported.
            self._mark_reported(exc)
            raise
        with self._lock:
            self._pending[target] = handle
            self._handles.append(handle)
            self._settled[handle] = threading.Event()
        handle.committed.add_done_callback(lambda fut: self._on_done(target, handle, fut))
        if not self.async_save:
            self._wait_handle(handle)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Wait for a pending save of ``path``, then load it like Lightning's ``TorchCheckpointIO``."""
        import io

        target, options = self._target(path, kwargs.pop("storage_options", None))
        self._wait_path(target)
        self._raise_failures()
        is_url = remote.is_url(target)
        if not is_url and not os.path.isfile(target):
            raise FileNotFoundError(f"Checkpoint file not found: {target}")
        location = _cpu if map_location is None else map_location
        if self.enc_key is None and not self.crc_check:
            with remote.open_for_read(target, options) if is_url else open(target, "rb") as f:
                return torch.load(f, map_location=location, weights_only=weights_only)
        from torchaux.checkpoint.formats.torch_save import integrity
        from torchaux.checkpoint.load import _read_plain

        data = _read_plain(target, self.enc_key, self.enc_mode, storage_options=options)
        if self.crc_check:
            integrity.verify_zip_crc(data, target)
        return torch.load(io.BytesIO(data), map_location=location, weights_only=weights_only)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Wait for a pending save of ``path``, then delete the file (or folder)."""
        target, options = self._target(path, None)
        self._wait_path(target)
        self._raise_failures()
        if remote.is_url(target):
            fs, key = remote.filesystem(target, options)
            fs.invalidate_cache()
            if fs.exists(key):
                fs.rm(key, recursive=True)
        else:
            remove_tree(target)

    def teardown(self) -> None:
        """Wait for every pending save; raise the first failure nobody has seen.

        The plugin stays usable: Lightning calls this after every ``fit``,
        ``validate`` and ``test``, and a second ``fit`` saves again.
        """
        with self._lock:
            handles = list(self._handles)
        for handle in handles:
            self._settle(handle)  # waits; reporting is left to _raise_failures
        self._raise_failures()

    def wait(self) -> None:
        """Alias of :meth:`teardown` for Fabric loops: block until every save is durable."""
        self.teardown()

    # -- internals ---------------------------------------------------------------

    def _get_saver(self) -> AsyncSaver:
        with self._lock:
            if self._saver is None:
                self._saver = AsyncSaver(name="torchaux-lightning-writer")
            return self._saver

    def _submit(self, saver: AsyncSaver, checkpoint: dict[str, Any], target: str,
                options: dict[str, Any] | None) -> SaveHandle:
        if self.enc_key is None and not self.crc_check:
            return save_async(checkpoint, target, saver=saver, storage_options=options)
        import functools

        from torchaux.checkpoint.save import WriteSpec

        sink = saver.sink
        if remote.is_url(target):
            remote.check_target(target, options, "TorchauxCheckpointIO.save_checkpoint")
            sink = remote.sink_for(target, sink, options)
        elif sink is atomic_write:
            sink = functools.partial(atomic_write, mode=0o600)
        spec = WriteSpec(
            format="ckpt", path=target, sink=sink, enc_key=self.enc_key, enc_mode=self.enc_mode,
            crc_check=self.crc_check, names=[], metadata={},
        )
        saver.reserve()
        try:
            snapshot = staging.stage(
                checkpoint, pool=saver.pool, pickle_module=pickle, pickle_protocol=DEFAULT_PROTOCOL,
                crc32=True,
            )
        except BaseException:
            saver.cancel_reservation()
            raise
        return saver.submit(snapshot, spec, target)

    def _target(self, path: object, storage_options: Any) -> tuple[str, dict[str, Any] | None]:
        """``(local real path or URL, fsspec options for a URL)``."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
        text = os.fsdecode(path)
        if remote.is_url(text) and not text.startswith("file://"):
            given = self.storage_options if storage_options is None else storage_options
            options = remote.check_storage_options(given, text) or None
            remote.filesystem(text, options)  # S3 only: a clear error for other stores
            return text, options
        if storage_options is not None:
            raise TypeError(
                "storage_options only apply to remote URLs such as 's3://bucket/run/x.ckpt'; "
                f"got storage_options for the local path {text!r}: drop them"
            )
        if text.startswith("file://"):
            text = text[len("file://"):]
        return os.path.realpath(str(Path(text).expanduser())), None

    def _on_done(self, target: str, handle: SaveHandle, fut: Any) -> None:
        # Runs on the writer thread once the save committed or failed.
        try:
            if fut.exception() is None and self.on_committed is not None:
                self.on_committed(target)
        except BaseException as exc:  # noqa: BLE001 - re-raised at the next hook
            with self._lock:
                self._callback_errors.append(exc)
        finally:
            with self._lock:
                if self._pending.get(target) is handle:
                    del self._pending[target]
                settled = self._settled.pop(handle, None)
            if settled is not None:
                settled.set()

    def _settle(self, handle: SaveHandle) -> BaseException | None:
        exc = handle.committed.exception()
        with self._lock:
            settled = self._settled.get(handle)
        if settled is not None:
            settled.wait()
        return exc

    def _wait_path(self, target: str) -> None:
        with self._lock:
            handle = self._pending.get(target)
        if handle is not None:
            self._wait_handle(handle)

    def _wait_handle(self, handle: SaveHandle) -> None:
        exc = self._settle(handle)
        with self._lock:
            unreported = handle in self._handles
            if exc is not None and unreported:
                self._handles.remove(handle)
        if exc is not None and unreported:
            handle.exception()  # observed: the saver must not raise it a second time
            raise exc

    def _mark_reported(self, exc: BaseException) -> None:
        with self._lock:
            self._handles = [
                h for h in self._handles if not (h.done() and h.committed.exception() is exc)
            ]

    def _raise_failures(self) -> None:
        with self._lock:
            if self._callback_errors:
                raise self._callback_errors.pop(0)
            # Committed saves need no more attention; failures stay listed until
            # reported, one per hook, so none is dropped.
            self._handles = [
                h for h in self._handles if not h.done() or h.committed.exception() is not None
            ]
            failed = next((h for h in self._handles if h.done()), None)
            if failed is not None:
                self._handles.remove(failed)
        if failed is not None:
            exc = failed.exception()  # marks it observed for the saver too
            assert exc is not None
            raise exc


def _register_other_base() -> None:
    # Lightning and pytorch_lightning each check isinstance against their own
    # CheckpointIO; both are ABCs, so one registration makes this plugin fit both.
    for module in ("lightning.fabric.plugins.io.checkpoint_io",
                   "lightning_fabric.plugins.io.checkpoint_io"):
        try:
            base = __import__(module, fromlist=["CheckpointIO"]).CheckpointIO
        except ImportError:
            continue
        if not issubclass(TorchauxCheckpointIO, base):
            base.register(TorchauxCheckpointIO)


_register_other_base()
