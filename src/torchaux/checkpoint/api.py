"""Public checkpoint entry points: validate at the boundary, then stage, write, commit."""

from __future__ import annotations

import io
import os
import pickle
from typing import IO, Any

import torch
from torch.serialization import DEFAULT_PROTOCOL

from torchaux.checkpoint.engine import fence, staging
from torchaux.checkpoint.formats.torch_save.writer import archive_name_for, write_torch_save
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle, default_saver
from torchaux.checkpoint.storage import remote

__all__ = ["save_async"]


def _check_target(
    f: object, who: str = "save_async", storage_options: dict[str, Any] | None = None
) -> str | None:
    """Validate ``f``; return the absolute path (or the URL), or None for a file object."""
    remote.check_storage_options(storage_options, f)
    if remote.is_url(f):  # fsspec URL: checked and written by storage/remote.py
        return remote.check_target(f, storage_options, who)  # type: ignore[arg-type]
    if isinstance(f, (str, os.PathLike)):
        path = os.fsdecode(f)
        if path == "":
            raise ValueError(f"{who} needs a file path or a writable binary file; got ''")
        # Write through a symlink to the file it names (as torch.save does)
        # instead of replacing the link with a regular file.
        path = os.path.realpath(path)
        if os.path.isdir(path):
            raise ValueError(
                f"{who} target {path!r} is a directory; pass a file path such as "
                f"{os.path.join(path, 'model.pt')!r}"
            )
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ValueError(
                f"{who} target directory {parent!r} does not exist; create it first "
                "(os.makedirs(dir, exist_ok=True))"
            )
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(
                f"{who} target {path!r} exists and is not a regular file (a FIFO or "
                "device?); saves replace files atomically, so pass a file path, or "
                "open the target yourself and pass the binary file object"
            )
        return path
    if callable(getattr(f, "write", None)):
        if isinstance(f, io.TextIOBase):
            raise TypeError(
                f"{who} needs a binary file object (mode 'wb'), got text stream {type(f).__name__}; "
                "open the file with mode 'wb' or use io.BytesIO"
            )
        if getattr(f, "closed", False):
            raise ValueError(f"{who} got a closed file object; pass an open binary file")
        mode = getattr(f, "mode", "b")
        if isinstance(mode, str) and "b" not in mode:
            raise TypeError(
                f"{who} needs a binary file object (mode 'wb'), got mode {mode!r}"
            )
        return None
    raise TypeError(
        f"{who} target must be a str/os.PathLike path or a binary file-like object "
        f"with a write() method, got {type(f).__name__}"
    )


def _check_options(
    pickle_module: Any,
    pickle_protocol: object,
    use_new_zipfile: object,
    disable_byteorder_record: object,
    model: object,
) -> None:
    if use_new_zipfile is False:
        # Same type as torch_npu (spec §1 step 1), with a usable message.
        raise RuntimeError(
            "save_async writes only the zip-based torch.save format; "
            "pass _use_new_zipfile_serialization=True (the default)"
        )
    if not isinstance(getattr(pickle_module, "Pickler", None), type):
        raise TypeError(
            "pickle_module must provide a Pickler class (like the standard 'pickle' "
            f"module), got {pickle_module!r}"
        )
    if isinstance(pickle_protocol, bool) or not isinstance(pickle_protocol, int):
        raise TypeError(f"pickle_protocol must be an int, got {type(pickle_protocol).__name__}")
    if not 2 <= pickle_protocol <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(
            f"pickle_protocol must be between 2 and {pickle.HIGHEST_PROTOCOL} "
            f"(torch.load needs >= 2), got {pickle_protocol}"
        )
    if not isinstance(disable_byteorder_record, bool):
        raise TypeError(
            "_disable_byteorder_record must be a bool, got "
            f"{type(disable_byteorder_record).__name__}"
        )
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module or None, got {type(model).__name__}; "
            "pass the module whose next forward/backward should wait for staging"
        )


def save_async(
    obj: object,
    f: str | os.PathLike[str] | IO[bytes],
    pickle_module: Any = pickle,
    pickle_protocol: int = DEFAULT_PROTOCOL,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    model: torch.nn.Module | None = None,
    *,
    saver: AsyncSaver | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SaveHandle:
    """Save ``obj`` like ``torch.save`` without waiting for the disk.

    The file holds exactly the values at the moment of the call.  By default
    the call returns once every tensor is copied into reusable host buffers
    (one ``memcpy`` of the state); the file is written, fsynced and atomically
    renamed into place by a background thread.  With ``model=`` the call
    returns at once and the copies overlap the next forward: ``model``'s next
    forward (for its buffers), its backward and any optimizer step wait only
    if the copies are still running.

    Args:
        obj: anything ``torch.save`` accepts.
        f: file path (written atomically: temp file, fsync, rename, fsync of
            the directory) or a binary file object (written in place by the
            background thread: do not touch it until the handle is done).
        pickle_module: module providing ``Pickler``.
        pickle_protocol: pickle protocol (2..HIGHEST_PROTOCOL).
        _use_new_zipfile_serialization: must be True; False raises RuntimeError.
        _disable_byteorder_record: omit the ``byteorder`` record, as torch.save.
        model: the module being trained; enables the overlapped mode above.
        saver: the :class:`AsyncSaver` to use (default: the process-wide one).
        storage_options: fsspec options for a URL ``f`` such as
            ``"s3://bucket/key.pt"`` (credentials, ``client_kwargs``); the
            object appears only once its upload completes.

    Returns:
        A :class:`SaveHandle`; ``handle.wait()`` blocks until the file is
        durable and re-raises the save's original exception if it failed.

    Raises:
        TypeError, ValueError: bad arguments, before any I/O.
        RuntimeError: ``_use_new_zipfile_serialization=False``.
        Exception: the unobserved failure of this saver's previous save.

    Example:
        >>> import os, torch, torchaux
        >>> path = os.path.join(doctest_tmp, "weights.pt")
        >>> state = {"w": torch.ones(3), "step": 7}
        >>> handle = torchaux.save_async(state, path)
        >>> state["w"].zero_()  # safe: the snapshot was taken at the call
        tensor([0., 0., 0.])
        >>> handle.wait() == path
        True
        >>> torch.load(path, weights_only=True)
        {'w': tensor([1., 1., 1.]), 'step': 7}
    """
    _check_options(
        pickle_module, pickle_protocol, _use_new_zipfile_serialization,
        _disable_byteorder_record, model,
    )
    path = _check_target(f, storage_options=storage_options)
    if saver is not None and not isinstance(saver, AsyncSaver):
        raise TypeError(f"saver must be an AsyncSaver or None, got {type(saver).__name__}")
    saver = saver or default_saver()
    saver.reserve()
    try:
        snapshot = staging.stage(
            obj,
            pool=saver.pool,
            pickle_module=pickle_module,
            pickle_protocol=pickle_protocol,
            defer_cpu_copies=model is not None,
            model_buffers=model.buffers() if model is not None else (),
        )
    except BaseException:
        saver.cancel_reservation()
        raise

    def write(snap: staging.Snapshot) -> str | None:
        if path is None:
            write_torch_save(snap, f, disable_byteorder_record=_disable_byteorder_record)  # type: ignore[arg-type]
            return None
        with remote.sink_for(path, saver.sink, storage_options)(path) as out:
            write_torch_save(
                snap, out, archive_name=archive_name_for(path),
                disable_byteorder_record=_disable_byteorder_record,
            )
        return path

    if model is not None:
        fence.arm(model, snapshot)
    handle = saver.submit(snapshot, write, path)
    if model is not None:
        handle.staged.add_done_callback(lambda _: fence.disarm(model, snapshot))
    return handle
