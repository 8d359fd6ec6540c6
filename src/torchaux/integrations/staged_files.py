"""The files of one framework checkpoint, staged together and written by one writer job.

A framework checkpoint is a folder of files (model shards, ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``...).  :func:`save_files` takes them all at
one call, on the training thread:

* every file's object is pickled (its Python values fixed) and its storages
  get warm host buffers from the saver's pool: one reservation, one job;
* with ``model=``, the bytes of the files marked ``defer`` (the big ones: the
  weights and the optimizer state) are not copied at the call: the writer
  thread copies them first thing, while the next forward runs, under the
  engine's ``model=`` fences (:mod:`torchaux.checkpoint.engine.fence`: the
  model's forward, gradient accumulation into its parameters, every optimizer
  step and ``load_state_dict`` wait for what they would change, copying it
  themselves if the writer has not yet; any other in-place change fails the
  save with :class:`~torchaux.errors.TensorChangedError`).  The training
  thread then pays the pickling and bookkeeping, not the memcpy;
* the writer job then writes every file through the saver's sink, in order.

``durable=False`` skips the per-file fsync and directory fsync of the default
sink: for files in a staging folder that
:func:`~torchaux.checkpoint.storage.directory.publish_directory` fsyncs, file
by file, before the folder is renamed into place.

Example:
    >>> import os, torch
    >>> from torchaux import AsyncSaver
    >>> saver = AsyncSaver()
    >>> w = {"w": torch.ones(2)}
    >>> files = [StagedFile(os.path.join(doctest_tmp, "m.safetensors"), w, "safetensors"),
    ...          StagedFile(os.path.join(doctest_tmp, "o.pt"), {"step": 3}, "torch")]
    >>> handle = save_files(files, saver=saver)
    >>> w["w"].zero_()  # the files hold the values at the call
    tensor([0., 0.])
    >>> _ = handle.wait(); saver.close()
    >>> torch.load(os.path.join(doctest_tmp, "o.pt"))
    {'step': 3}
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.serialization import DEFAULT_PROTOCOL

from torchaux.checkpoint.engine import fence, staging
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.formats.safetensors.writer import check_safetensors_dtypes, write_safetensors
from torchaux.checkpoint.formats.torch_save.writer import (
    archive_name_for,
    capture_options,
    write_torch_save,
)
from torchaux.checkpoint.storage.commit import atomic_write

__all__ = ["StagedFile", "save_files"]


@dataclass(frozen=True)
class StagedFile:
    """One file of a checkpoint.

    Args:
        path: absolute target path (its directory must exist when written).
        obj: for ``"torch"``, anything ``torch.save`` takes; for
            ``"safetensors"``, a dict of name to tensor.
        format: ``"torch"`` (``torch.save``'s zip, loads with ``torch.load``)
            or ``"safetensors"`` (``{"format": "pt"}`` metadata, as
            ``save_pretrained``).
        defer: copy its bytes on the writer thread under the ``model=`` fences
            (only when :func:`save_files` gets a ``model``).
        mode: permission bits of the new file (default sink only); ``None``:
            ``0o666`` minus the umask, as ``open()``.
    """

    path: str
    obj: Any
    format: Literal["torch", "safetensors"]
    defer: bool = False
    mode: int | None = None


def _stage(file: StagedFile, pool: staging.HostBufferPool, deferred: bool,
           order: Sequence[torch.Tensor]) -> staging.Snapshot:
    if file.format == "safetensors":
        # No data.pkl in a safetensors file: the tensors by name, nothing pickled.
        return staging.stage(
            list(file.obj.values()), pool=pool, pickle_module=pickle, pickle_protocol=2,
            defer_cpu_copies=deferred, model_buffers=order, index=file.obj, serialize=False,
        )
    return staging.stage(
        file.obj, pool=pool, pickle_module=pickle, pickle_protocol=DEFAULT_PROTOCOL,
        defer_cpu_copies=deferred, model_buffers=order,
    )


def save_files(
    files: Sequence[StagedFile],
    *,
    saver: AsyncSaver,
    model: torch.nn.Module | None = None,
    durable: bool = True,
) -> SaveHandle:
    """Stage ``files`` now; write them in order on ``saver``'s writer thread.

    Args:
        files: the files of one checkpoint.
        saver: the writer (its sink, pool and back-pressure slot).
        model: the module being trained: the ``defer`` files are copied in the
            background under its fences (see the module docstring).
        durable: ``False``: the default sink skips fsyncs (the caller's
            :func:`~torchaux.checkpoint.storage.directory.publish_directory`
            makes the files durable).

    Returns:
        One handle for all files: committed (result ``None``) once every file
        is written, or failed with the first error (later files are then not
        written).

    Raises:
        TypeError, ValueError: a safetensors entry that is not a tensor or a
            dtype safetensors cannot hold, before anything is staged.
        Exception: the unobserved failure of an earlier save on ``saver``.
    """
    for file in files:
        if file.format not in ("torch", "safetensors"):
            raise ValueError(f"StagedFile.format must be 'torch' or 'safetensors', got {file.format!r}")
        if file.format == "safetensors":
            if not isinstance(file.obj, dict):
                raise TypeError(f"a safetensors StagedFile needs a dict of tensors, got "
                                f"{type(file.obj).__name__} for {file.path!r}")
            check_safetensors_dtypes(file.obj)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    # Staged eagerly from inside an optimizer step: its pre-hooks (the fence) already ran.
    defer = model is not None and not fence.inside_optimizer_step()
    order = fence.model_tensors(model) if defer else []  # type: ignore[arg-type]
    options = capture_options()  # torch's save settings are the calling thread's
    sink: Callable[..., Any] = saver.sink
    snaps: list[staging.Snapshot] = []
    armed: list[staging.Snapshot] = []
    handle: SaveHandle | None = None
    submitting = False
    saver.reserve()
    pool = saver.pool  # the reservation's pool: buffers go back to the same one
    try:
        for file in files:
            deferred = defer and file.defer
            snaps.append(_stage(file, pool, deferred, order if deferred else ()))
            if deferred:
                fence.arm(model, snaps[-1])  # type: ignore[arg-type]
                armed.append(snaps[-1])

        def write(_: staging.Snapshot) -> None:
            try:
                _finish(snaps, armed, model)
                for file, snap in zip(files, snaps):
                    target = sink
                    if sink is atomic_write:
                        target = functools.partial(atomic_write, mode=file.mode,
                                                   fsync=None if durable else False)
                    with target(file.path) as out:
                        if file.format == "safetensors":
                            write_safetensors(snap, out, list(file.obj), {"format": "pt"})
                        else:
                            write_torch_save(snap, out, archive_name=archive_name_for(file.path),
                                             options=options)
            finally:
                for snap in armed:
                    fence.disarm(model, snap)  # type: ignore[arg-type]
                for snap in snaps:
                    snap.release(pool)
                snaps.clear()

        empty = staging.stage({}, pool=pool, pickle_module=pickle, pickle_protocol=2)
        submitting = True
        handle = saver.submit(empty, write, None)
        return handle
    except BaseException:
        # KeyboardInterrupt may land on any line: no armed fence, no held buffers,
        # and no reserved slot unless the saver took the job.
        if handle is None:
            for snap in armed:
                fence.disarm(model, snap)  # type: ignore[arg-type]
            for snap in snaps:
                snap.release(pool)
            if submitting:
                saver.release_unsubmitted()
            else:
                saver.cancel_reservation()
        raise


def _finish(snaps: list[staging.Snapshot], armed: list[staging.Snapshot],
            model: torch.nn.Module | None) -> None:
    """Complete every snapshot's copies (deferred ones first), releasing each one's fences.

    Every snapshot is finished even when one fails (so no fence stays armed
    and no live storage stays referenced); the first failure is raised.
    """
    error: BaseException | None = None
    fenced = {id(s) for s in armed}  # by identity: a Snapshot's == compares its fields
    for snap in armed + [s for s in snaps if id(s) not in fenced]:
        try:
            snap.finish_staging()
        except BaseException as exc:  # noqa: BLE001 - the first one is raised below
            error = error or exc
        if id(snap) in fenced:
            fence.disarm(model, snap)  # type: ignore[arg-type]
    if error is not None:
        raise error
