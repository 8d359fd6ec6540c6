"""The consistent snapshot: the only module that reads live tensors.

:func:`stage` runs on the caller's thread.  It pickles ``obj`` exactly as
``torch.save`` would (same ``persistent_id`` records, so storage sharing,
views, strides and dtypes survive) but instead of writing storages it copies
each one into a reusable host buffer from a :class:`HostBufferPool`.  Python
values (step counters, learning rates, hyper-parameters) are fixed by that
pickle, so the file shows the object as it was at the call.

Copies are done in one of two ways:

* accelerator storages: asynchronous device-to-host copies on a side stream
  that first waits on the caller's current stream, into pinned buffers; a
  device event marks the end.  Later kernels are fenced with a stream wait
  (``current_stream().wait_event``), never a host synchronisation.
* CPU storages: ``memcpy`` into warm buffers, either right away (``defer=False``)
  or later on the writer thread (``defer=True``, the ``model=`` mode) while the
  training thread runs the next forward; :meth:`Snapshot.fence_forward` and
  :meth:`Snapshot.fence_all` then block only until the copies are done.

Storages that belong to the model's buffers (BatchNorm statistics and the like,
which forward mutates) are copied first so the forward fence is short.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.serialization import location_tag, normalize_storage_type

from torchaux import _knobs
from torchaux.checkpoint.engine.pool import HostBufferPool

__all__ = ["HostBufferPool", "Snapshot", "TensorLocation", "stage", "fence_blocked_seconds"]

# Seconds training threads spent blocked in fences, process-wide (diagnostics
# and `torchaux bench`); float += under the GIL is enough for a statistic.
_fence_blocked = [0.0]


def fence_blocked_seconds() -> float:
    """Total seconds any thread has waited in a ``model=`` fence so far."""
    return _fence_blocked[0]


def _wait(event: threading.Event) -> None:
    if not event.is_set():
        start = time.perf_counter()
        event.wait()
        _fence_blocked[0] += time.perf_counter() - start


@dataclass(frozen=True)
class TensorLocation:
    """Where a named tensor's elements live inside a staged storage."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


@dataclass
class _Record:
    key: str
    source: torch.UntypedStorage | None  # live storage; dropped once copied
    staged: torch.UntypedStorage
    is_buffer: bool


@dataclass
class _DeviceCopy:
    """Copies of one accelerator device, with the events that fence them."""

    device: torch.device
    buffers_done: Any = None  # device event after the model-buffer group
    all_done: Any = None  # device event after every copy


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    # A uint8 view over the whole storage: copying bytes keeps every dtype
    # (bf16, fp8, complex, bool, quantised payloads) bit-exact.
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass
class Snapshot:
    """A pickled object plus staged host copies of each of its storages.

    ``pickled`` is the exact ``data.pkl`` payload of ``torch.save``;
    ``records()`` lists ``(key, host_storage)`` in key order.
    """

    pickled: bytes
    _records: list[_Record]
    _devices: list[_DeviceCopy] = field(default_factory=list)
    _buffers_ready: threading.Event = field(default_factory=threading.Event)
    _all_ready: threading.Event = field(default_factory=threading.Event)
    _deferred: bool = False
    #: name -> location, for formats that store tensors by name (safetensors)
    tensor_index: dict[str, TensorLocation] = field(default_factory=dict)
    _by_key: dict[str, torch.UntypedStorage] | None = None

    def staged_tensor(self, name: str) -> torch.Tensor:
        """The staged host copy of the tensor indexed as ``name`` (writer thread)."""
        loc = self.tensor_index[name]
        if self._by_key is None:
            self._by_key = {r.key: r.staged for r in self._records}
        storage = self._by_key[loc.key]
        return torch.empty(0, dtype=loc.dtype).set_(
            storage, loc.storage_offset, loc.shape, loc.stride
        )

    @property
    def nbytes(self) -> int:
        """Total staged bytes."""
        return sum(r.staged.nbytes() for r in self._records)

    def records(self) -> list[tuple[str, torch.UntypedStorage]]:
        """``(key, staged host storage)`` pairs in the order ``torch.save`` writes them."""
        return [(r.key, r.staged) for r in self._records]

    # -- staging ------------------------------------------------------------

    def _copy_cpu(self, group: Callable[[_Record], bool]) -> None:
        for r in self._records:
            if r.source is not None and r.source.device.type == "cpu" and group(r):
                _as_bytes(r.staged).copy_(_as_bytes(r.source))
                r.source = None

    def finish_staging(self) -> None:
        """Complete deferred CPU copies and wait for device copies (writer thread).

        Always releases the fences, also when a copy fails, so a training
        thread blocked in a fence can never deadlock on a failed save.
        """
        try:
            if self._deferred:
                self._copy_cpu(lambda r: r.is_buffer)
                self._buffers_ready.set()
                self._copy_cpu(lambda r: not r.is_buffer)
            for dev in self._devices:
                dev.all_done.synchronize()
            for r in self._records:
                r.source = None  # live storages may now be freed by their owner
        finally:
            self._buffers_ready.set()
            self._all_ready.set()

    # -- fences (training thread) ------------------------------------------

    def fence_forward(self) -> None:
        """Order the next forward after the copies of model buffers."""
        _wait(self._buffers_ready)
        for dev in self._devices:
            _device_module(dev.device).current_stream(dev.device).wait_event(dev.buffers_done)

    def fence_all(self) -> None:
        """Order everything after this point after every copy of the snapshot."""
        _wait(self._all_ready)
        for dev in self._devices:
            _device_module(dev.device).current_stream(dev.device).wait_event(dev.all_done)

    def is_staged(self) -> bool:
        """True once every byte is on the host (host side only; never blocks)."""
        return self._all_ready.is_set()

    def release(self, pool: HostBufferPool) -> None:
        """Return the host buffers to ``pool``; the snapshot is unusable after."""
        pool.release(r.staged for r in self._records)
        self._records = []
        self._by_key = None


def _device_module(device: torch.device) -> Any:
    return torch.get_device_module(device.type)


def _pickle(
    obj: object, pickle_module: Any, protocol: int
) -> tuple[bytes, dict[str, torch.UntypedStorage]]:
    """Pickle ``obj`` with torch.save's storage records; return payload and storages.

    The ``persistent_id`` records follow torch/serialization.py ``_save``
    (torch 2.13): ``("storage", storage_type, key, location, numel)``, keys
    numbered by first appearance, one entry per distinct storage.
    """
    import io

    storages: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}
    dtypes: dict[int, torch.dtype] = {}

    def persistent_id(o: object) -> tuple[Any, ...] | None:
        if isinstance(o, torch.storage.TypedStorage):
            storage, dtype = o._untyped_storage, o.dtype
            storage_type = getattr(torch, o._pickle_storage_type())
            numel = o._size()
        elif torch.is_storage(o):
            storage, dtype = o, torch.uint8  # type: ignore[assignment]
            storage_type = normalize_storage_type(type(o))
            numel = storage.nbytes()
        else:
            return None
        if storage.device.type == "meta":
            raise ValueError(
                "save_async got a tensor on the 'meta' device, which has no data to save; "
                "materialise it (e.g. module.to_empty(device='cpu')) or leave it out"
            )
        ptr = storage.data_ptr()
        if ptr != 0:
            # torch.load cannot rebuild one memory region as two dtypes; reject as torch.save does.
            if dtypes.setdefault(ptr, dtype) != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as "
                    "different types"
                )
        key = keys.setdefault(storage._cdata, str(len(keys)))
        storages[key] = storage
        return ("storage", storage_type, key, location_tag(storage), numel)

    class _Pickler(pickle_module.Pickler):  # type: ignore[misc, name-defined]
        def persistent_id(self, o: object) -> tuple[Any, ...] | None:
            return persistent_id(o)

    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue(), storages


def _index(
    named: Mapping[str, torch.Tensor], storages: dict[str, torch.UntypedStorage]
) -> dict[str, TensorLocation]:
    key_of = {s._cdata: k for k, s in storages.items()}
    out = {}
    for name, t in named.items():
        key = key_of.get(t.untyped_storage()._cdata)
        if key is None:
            raise ValueError(f"tensor {name!r} is not part of the object being saved")
        out[name] = TensorLocation(
            key, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset()
        )
    return out


_side_streams: dict[torch.device, Any] = {}
_side_streams_lock = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    # One long-lived copy stream per device (creating streams per save leaks
    # handles on some backends); created under a lock so two first saves
    # cannot race into two streams (a torch_npu flaw, spec §1 "Limits" 4).
    with _side_streams_lock:
        stream = _side_streams.get(device)
        if stream is None:
            stream = _device_module(device).Stream(device)
            _side_streams[device] = stream
        return stream


def _enqueue_device_copies(records: list[_Record]) -> list[_DeviceCopy]:
    by_device: dict[torch.device, list[_Record]] = defaultdict(list)
    for r in records:
        if r.source is not None and r.source.device.type != "cpu":
            by_device[r.source.device].append(r)
    copies = []
    for device, recs in by_device.items():
        module = _device_module(device)
        ordered = sorted(recs, key=lambda r: not r.is_buffer)
        if not hasattr(module, "Stream"):
            # Backends without a stream API (e.g. MPS): blocking copies.
            for r in ordered:
                assert r.source is not None
                _as_bytes(r.staged).copy_(_as_bytes(r.source))
                r.source = None
            module.synchronize()
            continue
        side = _side_stream(device)
        # The copies must see every kernel the caller already queued (e.g. the
        # optimizer step just before the save): torch_npu omits this wait.
        side.wait_stream(module.current_stream(device))
        copy = _DeviceCopy(device)
        with module.stream(side):
            for r in ordered:
                if not r.is_buffer and copy.buffers_done is None:
                    copy.buffers_done = side.record_event()
                assert r.source is not None
                _as_bytes(r.staged).copy_(_as_bytes(r.source), non_blocking=True)
            copy.all_done = side.record_event()
            if copy.buffers_done is None:
                copy.buffers_done = copy.all_done
        copies.append(copy)
    return copies


def stage(
    obj: object,
    *,
    pool: HostBufferPool,
    pickle_module: Any,
    pickle_protocol: int,
    defer_cpu_copies: bool = False,
    model_buffers: Iterable[torch.Tensor] = (),
    index: Mapping[str, torch.Tensor] | None = None,
) -> Snapshot:
    """Take a consistent snapshot of ``obj`` (call on the training thread).

    Args:
        obj: anything ``torch.save`` accepts.
        pool: where host buffers come from (and go back to).
        pickle_module: module providing ``Pickler`` (``pickle`` by default).
        pickle_protocol: pickle protocol for ``data.pkl``.
        defer_cpu_copies: leave CPU copies to :meth:`Snapshot.finish_staging`
            (``model=`` mode); otherwise they are done before returning and
            device copies are fenced on the current stream right away.
        model_buffers: tensors whose storages must be copied first (forward
            mutates them).
        index: named tensors (all reachable from ``obj``) to record in
            :attr:`Snapshot.tensor_index`.

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
    pickled, storages = _pickle(obj, pickle_module, pickle_protocol)
    tensor_index = _index(index or {}, storages)
    buffer_ptrs = {b.untyped_storage().data_ptr() for b in model_buffers}
    pin = _knobs.pin_memory_enabled() and torch.accelerator.is_available()
    records: list[_Record] = []
    try:
        for key, s in storages.items():
            pinned = pin and s.device.type != "cpu"
            buf = pool.acquire(s.nbytes(), pinned=pinned)
            records.append(_Record(key, s, buf, s.data_ptr() in buffer_ptrs and s.data_ptr() != 0))
        devices = _enqueue_device_copies(records)
        snapshot = Snapshot(
            pickled, records, devices, _deferred=defer_cpu_copies, tensor_index=tensor_index
        )
        if not defer_cpu_copies:
            snapshot._copy_cpu(lambda r: True)
            for dev in devices:
                _device_module(dev.device).current_stream(dev.device).wait_event(dev.all_done)
    except BaseException:
        pool.release(r.staged for r in records)
        raise
    return snapshot
