"""Taking a snapshot: :func:`stage`, on the caller's thread (with :mod:`.copies` the only reader of live tensors).

It pickles the object as ``torch.save`` would (or, for a flat tensor list,
only keys its storages), takes a warm host buffer per storage from the pool
and either copies at once or leaves the CPU copies to the writer and the
``model=`` fences (:class:`~.snapshot.Snapshot`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from torchaux import _knobs
from torchaux.checkpoint.engine import versions
from torchaux.checkpoint.engine.pickler import flat_storages, index_tensors, pickle_storages
from torchaux.checkpoint.engine.pickler import copy_order as _copy_order
from torchaux.checkpoint.engine.pool import HostBufferPool
from torchaux.checkpoint.engine.staging import crc_copies
from torchaux.checkpoint.engine.staging.copies import Record, device_module, enqueue_device_copies
from torchaux.checkpoint.engine.staging.snapshot import Snapshot

__all__ = ["stage", "buffer_requests"]

_CPU = torch.device("cpu")


def buffer_requests(obj: object) -> list[tuple[int, bool]]:
    """``(nbytes, pinned)`` of every host buffer a save of ``obj`` takes from the pool.

    >>> buffer_requests({"a": torch.ones(4), "b": torch.ones(2, dtype=torch.float64)})
    [(16, False), (16, False)]
    """
    import pickle

    _, storages = pickle_storages(obj, pickle, 2)
    pin = _knobs.pin_memory_enabled() and torch.accelerator.is_available()
    return [(s.nbytes(), pin and s.device.type != "cpu") for s in storages.values()]


def stage(
    obj: object,
    *,
    pool: HostBufferPool,
    pickle_module: Any,
    pickle_protocol: int,
    defer_cpu_copies: bool = False,
    model_buffers: Iterable[torch.Tensor] = (),
    index: Mapping[str, torch.Tensor] | None = None,
    serialize: bool = True,
    crc32: bool = False,
) -> Snapshot:
    """Take a consistent snapshot of ``obj`` (call on the training thread).

    Args:
        obj: anything ``torch.save`` accepts.
        pool: where host buffers come from (and go back to).
        pickle_module: module providing ``Pickler`` (``pickle`` by default).
        pickle_protocol: pickle protocol for ``data.pkl``.
        defer_cpu_copies: leave CPU copies to :meth:`Snapshot.finish_staging`
            and the fences (``model=`` mode), recording every tensor's version
            counter to check at its copy; otherwise they are done before
            returning and device copies are fenced on the current stream.
        model_buffers: tensors whose storages are copied first, in this
            order (the model's parameters and buffers, in module order).
        index: named tensors (all reachable from ``obj``) to record in
            :attr:`Snapshot.tensor_index`; with ``serialize=False`` and no
            ``index``, every tensor of the list by its position (``"0"``, ...).
        serialize: make the ``data.pkl`` payload (``Snapshot.pickled``).
            ``False`` for a flat list of tensors that the writer saves one
            by one (torchaux.distributed): no pickling at the call, and
            ``pickled`` is ``b""``.
        crc32: compute the CRC-32 of each large CPU storage during its copy
            (:mod:`.crc_copies`; :meth:`Snapshot.record_crcs`), for writers
            of torch.save's zip records; deferred copies on one thread.  Only
            with zlib-ng and the ``staging_crc`` knob on.

    Under ``torch.serialization.skip_data()`` nothing is copied: the
    snapshot records sizes only and the writer writes zeros, as torch.save.

    Returns:
        The snapshot; hand it to the writer, which calls ``finish_staging``.

    Example:
        >>> import pickle, torch
        >>> pool = HostBufferPool()
        >>> t = torch.arange(4.0)
        >>> snap = stage({"t": t}, pool=pool, pickle_module=pickle, pickle_protocol=2)
        >>> _ = t.add_(1)  # mutate right away: the snapshot keeps the old values
        >>> snap.finish_staging()
        >>> key, buf = snap.records()[0]
        >>> torch.frombuffer(bytearray(bytes(buf)), dtype=torch.float32).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    # The cyclic GC stays off while staging: pickling allocates millions of
    # short-lived tuples, and each threshold crossing made the collector walk
    # the caller's whole heap (10^5 small tensors: 1.0 s of 3.2 s, k_many.py).
    # Nothing staging allocates is cyclic garbage.  Re-enabled only if it was on.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _stage(obj, pool, pickle_module, pickle_protocol, defer_cpu_copies, model_buffers, index,
                      serialize, crc32)
    finally:
        if was_enabled:
            gc.enable()


def _stage(
    obj: object,
    pool: HostBufferPool,
    pickle_module: Any,
    pickle_protocol: int,
    defer_cpu_copies: bool,
    model_buffers: Iterable[torch.Tensor],
    index: Mapping[str, torch.Tensor] | None,
    serialize: bool,
    crc32: bool,
) -> Snapshot:
    skip = bool(torch.serialization._serialization_tls.skip_data)
    tensors: list[torch.Tensor] | None = [] if defer_cpu_copies and not skip else None
    if serialize:
        pickled, storages = pickle_storages(obj, pickle_module, pickle_protocol, tensors)
        tensor_index = index_tensors(index or {}, storages)
        tracked = (
            versions.track(tensors, {s._cdata: k for k, s in storages.items()})
            if tensors is not None else {}
        )
    else:
        if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
            raise TypeError("stage(serialize=False) takes a flat list of tensors")
        pickled = b""
        storages, tensor_index, tracked = flat_storages(obj, index, track=tensors is not None)
    if skip:
        records = [
            Record(k, None, torch.UntypedStorage(0), nbytes=s.nbytes()) for k, s in storages.items()
        ]
        snapshot = Snapshot(pickled, records, tensor_index=tensor_index, skip_data=True)
        snapshot._all_ready.set()
        return snapshot
    order, early = _copy_order(storages, model_buffers)
    # Each storage's device is looked up once (``storage.device.type`` costs
    # ~0.2 us warm and several times that on the cold caches of a training
    # step; it was read four times per storage); CPU-only states skip the
    # pinning knob and the accelerator query.
    on_device = {k for k, s in storages.items() if s.device != _CPU}
    pin = bool(on_device) and _knobs.pin_memory_enabled() and torch.accelerator.is_available()
    records: list[Record] = []
    buffers = pool.acquire_many([(s.nbytes(), pin and k in on_device) for k, s in storages.items()])
    try:
        records = [
            Record(key, s, buf, key in early, tracked.get(key), on_device=key in on_device)
            for (key, s), buf in zip(storages.items(), buffers)
        ]
        by_key = {r.key: i for i, r in enumerate(records)}
        copy_order = [by_key[k] for k in order]
        devices = enqueue_device_copies(records) if on_device else []
        with_crc = crc32 and crc_copies.AVAILABLE and _knobs.staging_crc_enabled()
        snapshot = Snapshot(
            pickled, records, devices, _deferred=defer_cpu_copies, tensor_index=tensor_index
        )
        if defer_cpu_copies:
            snapshot._crc = with_crc
            snapshot._obj = obj
            snapshot._order = [i for i in copy_order if not records[i].on_device]
            snapshot._position = {
                records[i].source._cdata: n + 1 for n, i in enumerate(snapshot._order)  # type: ignore[union-attr]
            }
            snapshot._device_storages = {
                r.source._cdata for r in records if r.on_device and r.source is not None
            }
        else:
            crc_copies.copy_records(records, with_crc)
            for dev in devices:
                device_module(dev.device).current_stream(dev.device).wait_event(dev.all_done)
    except BaseException:
        pool.release(buffers)
        raise
    return snapshot
