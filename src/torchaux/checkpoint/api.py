"""Public checkpoint entry points: validate at the boundary, then stage, write, commit."""

from __future__ import annotations

import io
import os
import pickle
import sys
from typing import IO, Any

import torch
from torch.serialization import DEFAULT_PROTOCOL

from torchaux.checkpoint.engine import fence, staging
from torchaux.checkpoint.formats.torch_save.writer import (
    archive_name_for,
    capture_options,
    write_torch_save,
)
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle, default_saver
from torchaux.checkpoint.storage import remote
from torchaux.errors import InvalidArgumentError, InvalidTargetError, NotWritableError

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
            raise InvalidTargetError(f"{who} needs a file path or a writable binary file; got ''")
        # Write through a symlink to the file it names (as torch.save does)
        # instead of replacing the link with a regular file.
        path = os.path.realpath(path)
        if os.path.isdir(path):
            raise InvalidTargetError(
                f"{who} target {path!r} is a directory; pass a file path such as "
                f"{os.path.join(path, 'model.pt')!r}"
            )
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise InvalidTargetError(
                f"{who} target directory {parent!r} does not exist; create it first "
                "(os.makedirs(dir, exist_ok=True))"
            )
        if os.path.exists(path) and not os.path.isfile(path):
            raise InvalidTargetError(
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
        writable = getattr(f, "writable", None)
        if callable(writable) and not writable():
            raise NotWritableError(
                f"{who} got a file object that is not open for writing "
                f"(mode {getattr(f, 'mode', '?')!r}); open it with mode 'wb'"
            )
        mode = getattr(f, "mode", "b")
        if isinstance(mode, str) and "b" not in mode:
            raise TypeError(
                f"{who} needs a binary file object (mode 'wb'), got mode {mode!r}"
            )
        return None
    raise InvalidArgumentError(
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
        raise InvalidArgumentError(
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


def _reserve(saver: AsyncSaver) -> bool:
    # True once the slot is ours, as one expression in the caller: no line of
    # save_async (where KeyboardInterrupt is delivered) lies in between.
    saver.reserve()
    return True


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
    follow_symlinks: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> SaveHandle:
    """Save ``obj`` like ``torch.save`` without waiting for the disk.

    The file holds exactly the values at the moment of the call.  By default
    the call returns once every tensor is copied into reusable host buffers
    (one ``memcpy`` of the state); the file is written, fsynced and atomically
    renamed into place by a background thread.  With ``model=`` the call
    returns at once and the copies overlap the next forward.

    What ``model=`` fences (each fence copies what is still missing on the
    calling thread, so it never costs more than eager staging): the forward
    of ``model`` or any submodule (what that forward can change: its own
    buffers, and its weight for ``nn.Embedding``/``nn.EmbeddingBag`` with
    ``max_norm``; these are copied first; a compiled module,
    ``torch.compile(m)`` or ``m.compile()``, the same for its whole subtree); gradient accumulation into ``model``'s parameters (so code
    after a backward sees every copy done); ``model.load_state_dict``; every
    ``torch.optim`` optimizer step.  A save from inside an optimizer step
    (a step pre-hook) is staged eagerly.  What the version check catches:
    any other in-place change (``tensor._version``) of a saved tensor between
    the call and its copy; the handle then raises
    :class:`~torchaux.errors.TensorChangedError` naming the tensor, nothing is
    committed and the previous file stays.  Not seen: writes through
    ``.data``, numpy/DLPack views or raw pointers, inference tensors, and an
    in-place kernel still running while its tensor's copy is checked.
    The caller's torch.save settings (``set_crc32_options``,
    ``torch.utils.serialization.config.save``, ``skip_data()``) are those of
    the calling thread at the call.

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
        follow_symlinks: ``True`` (torch.save's behaviour): a symlink at ``f``
            when called is followed and the file it names is replaced.
            ``False``: a symlink at ``f`` raises ``ValueError`` (use it in
            directories others can write, docs/SECURITY.md).  Either way a
            link planted after the call is replaced, never written through.
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
    if not isinstance(follow_symlinks, bool):
        raise TypeError(f"follow_symlinks must be a bool, got {type(follow_symlinks).__name__}")
    if not follow_symlinks and isinstance(f, (str, os.PathLike)) and os.path.islink(os.fsdecode(f)):
        raise ValueError(
            f"save_async target {os.fsdecode(f)!r} is a symlink and follow_symlinks=False; "
            "remove the link, or pass follow_symlinks=True to write to the file it names"
        )
    path = _check_target(f, storage_options=storage_options)
    if saver is not None and not isinstance(saver, AsyncSaver):
        raise TypeError(f"saver must be an AsyncSaver or None, got {type(saver).__name__}")
    process_saver = sys.modules.get("torchaux.checkpoint.engine.process_saver")
    if process_saver is not None and isinstance(saver, process_saver.ProcessSaver):
        raise TypeError(
            "save_async cannot use a ProcessSaver: its write step is a closure a writer "
            "process cannot run; pass an AsyncSaver (or none), or use "
            "torchaux.save_checkpoint, which supports writer processes"
        )
    saver = saver or default_saver()
    # Fixed now, on the calling thread: torch's save settings are per thread.
    options = capture_options()
    # A save from inside an optimizer step (a step pre-hook) is staged eagerly:
    # that step's pre-hooks, the fence among them, have already run.
    deferred = model is not None and not fence.inside_optimizer_step()

    def write(snap: staging.Snapshot) -> str | None:
        if path is None:
            write_torch_save(snap, f, disable_byteorder_record=_disable_byteorder_record, options=options)  # type: ignore[arg-type]
            return None
        with remote.sink_for(path, saver.sink, storage_options)(path) as out:
            write_torch_save(
                snap, out, archive_name=archive_name_for(path),
                disable_byteorder_record=_disable_byteorder_record, options=options,
            )
        return path

    snapshot: staging.Snapshot | None = None
    handle: SaveHandle | None = None
    reserved = submitting = False
    try:
        reserved = _reserve(saver)
        snapshot = staging.stage(
            obj,
            pool=saver.pool,
            pickle_module=pickle_module,
            pickle_protocol=pickle_protocol,
            defer_cpu_copies=deferred,
            model_buffers=fence.model_tensors(model) if deferred else (),  # type: ignore[arg-type]
            crc32=True,
        )
        if deferred:
            fence.arm(model, snapshot)  # type: ignore[arg-type]
        submitting = True
        handle = saver.submit(snapshot, write, path)
        if deferred:
            handle.staged.add_done_callback(lambda _: fence.disarm(model, snapshot))  # type: ignore[arg-type]
    except BaseException:
        # KeyboardInterrupt may land on any line: leave no armed fence and,
        # unless the saver took the job, no reserved slot or held buffers.
        if snapshot is not None and deferred:
            fence.disarm(model, snapshot)  # type: ignore[arg-type]
        if handle is None and not submitting:
            if snapshot is not None:
                snapshot.release(saver.pool)
            if reserved:
                saver.cancel_reservation()
        elif handle is None:  # interrupted in submit, perhaps before it took the slot
            saver.release_unsubmitted()
        raise
    return handle

