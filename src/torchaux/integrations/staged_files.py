"""The files of one framework checkpoint, staged together and written by one writer job.

A framework checkpoint is a folder of files (model shards, ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``...).  :func:`save_files` takes them all at
one call, on the training thread:

* every file's object is pickled (its Python values fixed) and its storages
  get warm host buffers from the saver's pool: one reservation, one job;
* with ``model=``, the bytes of the files marked ``defer`` (the big ones: the
  weights and the optimizer state) are not copied at the call: the writer
  thread copies them first thing, while the next step runs, under the
  engine's fences (:mod:`torchaux.checkpoint.engine.fence`), which wait for
  what they would change, copying it themselves if the writer has not yet:

  - ``defer="model"`` (weights): the model's forward, gradient accumulation
    into its parameters, ``load_state_dict`` and every optimizer step (the
    ``save_async(model=)`` fences);
  - ``defer="optimizer"`` (optimizer state, which only ``step()`` changes):
    every ``torch.optim`` optimizer step, so the copy also overlaps the
    backward;

  any other in-place change of a deferred tensor before its copy fails the
  save with :class:`~torchaux.errors.TensorChangedError` (never a silently
  mixed file).  The training thread pays the pickling and bookkeeping, not
  the memcpy;
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
        defer: ``None`` (copied at the call), ``"model"`` or ``"optimizer"``:
            copied on the writer thread under those fences (module docstring;
            only when :func:`save_files` gets a ``model``).
        mode: permission bits of the new file (default sink only); ``None``:
            ``0o666`` minus the umask, as ``open()``.
    """

    path: str
    obj: Any
    format: Literal["torch", "safetensors"]
    defer: Literal["model", "optimizer"] | None = None
    mode: int | None = None


#: What a ``defer="optimizer"`` snapshot is armed on: a module without
#: parameters or submodules, so only the process-wide optimizer-step fence
#: applies (and its own load_state_dict, which nobody calls).
_STEP_ONLY = torch.nn.Module()


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
        defer_cpu_copies=deferred, model_buffers=order, crc32=True,
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
        if file.defer not in (None, "model", "optimizer"):
            raise ValueError(f"StagedFile.defer must be None, 'model' or 'optimizer', got {file.defer!r}")
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
    armed: list[tuple[torch.nn.Module, staging.Snapshot]] = []
    handle: SaveHandle | None = None
    submitting = False
    saver.reserve()
    pool = saver.pool  # the reservation's pool: buffers go back to the same one
    try:
        # Deferred files first: the writer copies in this order (the model's
        # fences come before the optimizer step's).
        staged = sorted(range(len(files)), key=lambda i: (files[i].defer is None,
                                                          files[i].defer == "optimizer"))
        by_index: dict[int, staging.Snapshot] = {}
        for i in staged:
            file = files[i]
            deferred = defer and file.defer is not None
            by_model = deferred and file.defer == "model"
            by_index[i] = _stage(file, pool, deferred, order if by_model else ())
            snaps.append(by_index[i])
            if deferred:
                anchor = model if by_model else _STEP_ONLY
                fence.arm(anchor, by_index[i])  # type: ignore[arg-type]
                armed.append((anchor, by_index[i]))  # type: ignore[arg-type]
        in_order = [by_index[i] for i in range(len(files))]

        def write(_: staging.Snapshot) -> None:
            try:
                _finish(snaps, armed)
                for file, snap in zip(files, in_order):
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
                for anchor, snap in armed:
                    fence.disarm(anchor, snap)
                for snap in snaps:
                    snap.release(pool)
                snaps.clear()
                in_order.clear()

        empty = staging.stage({}, pool=pool, pickle_module=pickle, pickle_protocol=2)
        submitting = True
        handle = saver.submit(empty, write, None)
        return handle
    except BaseException:
        # KeyboardInterrupt may land on any line: no armed fence, no held buffers,
        # and no reserved slot unless the saver took the job.
        if handle is None:
            for anchor, snap in armed:
                fence.disarm(anchor, snap)
            for snap in snaps:
                snap.release(pool)
            if submitting:
                saver.release_unsubmitted()
            else:
                saver.cancel_reservation()
        raise


def _finish(snaps: list[staging.Snapshot],
            armed: list[tuple[torch.nn.Module, staging.Snapshot]]) -> None:
    """Complete every snapshot's copies (in staging order: deferred first), releasing its fences.

    Every snapshot is finished even when one fails (so no fence stays armed
    and no live storage stays referenced); the first failure is raised.
    """
    error: BaseException | None = None
    anchors = {id(snap): anchor for anchor, snap in armed}  # by identity: == compares fields
    for snap in snaps:
        try:
            snap.finish_staging()
        except BaseException as exc:  # noqa: BLE001 - the first one is raised below
            error = error or exc
        anchor = anchors.get(id(snap))
        if anchor is not None:
            fence.disarm(anchor, snap)
    if error is not None:
        raise error
