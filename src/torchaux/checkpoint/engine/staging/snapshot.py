"""The consistent snapshot: what :func:`.capture.stage` takes, the copies still to make, the fences.

:func:`~.capture.stage` runs on the caller's thread.  It pickles ``obj`` exactly as
``torch.save`` would (same ``persistent_id`` records, so storage sharing,
views, strides and dtypes survive) but instead of writing storages it copies
each one into a reusable host buffer from a :class:`HostBufferPool`.  Python
values (step counters, learning rates, hyper-parameters) are fixed by that
pickle, so the file shows the object as it was at the call.

Copies: accelerator storages go device-to-host on a side stream that first
waits on the caller's stream, into pinned buffers; later kernels are fenced
with a stream wait, never a host synchronisation.  CPU storages are copied
into warm buffers right away (default), or deferred (``model=``): the model's
tensors first, in module order, by the writer thread or by a training thread
reaching a fence, whichever comes first (:meth:`Snapshot.fence_upto`), each
checked against its version counter at the call (:mod:`.versions`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from torchaux.checkpoint.engine import versions
from torchaux.checkpoint.engine.pickler import TensorLocation
from torchaux.checkpoint.engine.pool import HostBufferPool
from torchaux.checkpoint.engine.staging import crc_copies
from torchaux.checkpoint.engine.staging.copies import (
    DeviceCopy,
    Record,
    copy_host,
    device_module,
)

__all__ = ["Snapshot", "fence_blocked_seconds"]

# Seconds training threads spent blocked in fences, process-wide (diagnostics
# and `torchaux bench`); float += under the GIL is enough for a statistic.
_fence_blocked = [0.0]




def fence_blocked_seconds() -> float:
    """Total seconds any thread has waited in a ``model=`` fence so far."""
    return _fence_blocked[0]



@dataclass
class Snapshot:
    """A pickled object plus staged host copies of each of its storages.

    ``pickled`` is the exact ``data.pkl`` payload of ``torch.save``;
    ``records()`` lists ``(key, host_storage)`` in key order.

    Deferred CPU copies (``model=``) run in copy order (``_order``: the
    model's tensors first, in module order) under ``_copy_lock``, one record
    per lock hold, by whichever thread needs them first: the writer in
    :meth:`finish_staging`, or a training thread in a fence
    (:meth:`fence_upto`), which copies what it needs itself instead of
    waiting behind a slow earlier write.  Each copied record's version
    counters are checked (:mod:`.versions`) before the record counts as
    copied, so a fenced update always comes after its check.
    """

    pickled: bytes
    _records: list[Record]
    _devices: list[DeviceCopy] = field(default_factory=list)
    _buffers_ready: threading.Event = field(default_factory=threading.Event)
    #: set once staging is over (done or failed): every fence is a no-op from then on
    _all_ready: threading.Event = field(default_factory=threading.Event)
    _deferred: bool = False
    #: name -> location, for formats that store tensors by name (safetensors)
    tensor_index: dict[str, TensorLocation] = field(default_factory=dict)
    _by_key: dict[str, torch.UntypedStorage] | None = None
    #: staged under ``torch.serialization.skip_data()``: records hold sizes, no bytes
    skip_data: bool = False
    _order: list[int] = field(default_factory=list)  # deferred CPU records, in copy order
    _position: dict[int, int] = field(default_factory=dict)  # storage _cdata -> copies needed
    _device_storages: set[int] = field(default_factory=set)  # _cdata of accelerator storages
    _cursor: int = 0  # deferred copies done (and checked)
    _copy_lock: threading.Lock = field(default_factory=threading.Lock)
    _error: BaseException | None = None  # a failed copy or check, raised by finish_staging
    _devices_checked: bool = False
    _obj: object = None  # the saved object, to name a changed tensor; dropped when staged
    _crc: bool = False  # deferred copies compute large records' CRC-32 (crc_copies)

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

    def record_crcs(self) -> list[int | None]:
        """Each record's CRC-32 when staging computed it (``stage(crc32=True)``), else ``None``."""
        return [r.crc for r in self._records]

    def sizes(self) -> list[tuple[str, int]]:
        """``(key, bytes of the live storage)`` in write order (also under ``skip_data``)."""
        return [(r.key, r.staged.nbytes() if r.nbytes is None else r.nbytes) for r in self._records]

    def needs(self, tensors: Iterable[torch.Tensor]) -> tuple[int, bool]:
        """(deferred copies to be done, whether device copies matter) before ``tensors`` are staged."""
        n, devices = 0, False
        for t in tensors:
            cdata = t.untyped_storage()._cdata
            n = max(n, self._position.get(cdata, 0))
            devices = devices or cdata in self._device_storages
        return n, devices

    # -- staging ------------------------------------------------------------

    def _copy_upto(self, n: int, *, on_writer: bool = False) -> None:
        # One record per lock hold, so the writer and a fence interleave; a
        # KeyboardInterrupt mid-copy leaves the record for the next caller.
        while self._cursor < n and not self._all_ready.is_set():
            with self._copy_lock:
                i = self._cursor
                if i >= n or self._all_ready.is_set():
                    return
                r = self._records[self._order[i]]
                if self._error is None:
                    try:
                        assert r.source is not None
                        if self._crc and crc_copies.fits(r.staged, r.source):
                            # The writer copies on its own thread only (it must not take
                            # training's cores); a fence, blocking training, on all of them.
                            r.crc = (crc_copies.copy_one_with_crc(r.staged, r.source) if on_writer
                                     else crc_copies.copy_host_with_crc([(r.staged, r.source)])[0])
                        else:
                            copy_host(r.staged, r.source)
                        if r.tracked:
                            self._error = versions.changed(r.tracked, r.key, self._obj)
                    except Exception as exc:  # noqa: BLE001 - raised by finish_staging, on the handle
                        self._error = exc
                    if self._error is not None:
                        self._cursor = len(self._order)  # no fence waits for a failed save
                        return
                r.source = None
                r.tracked = None
                self._cursor = i + 1

    def _check_devices(self) -> None:
        # Under _copy_lock.  Device records are checked once: by the first
        # fence (before the fenced kernels are queued) or after the copies.
        if self._devices_checked:
            return
        self._devices_checked = True
        for r in self._records:
            if r.tracked and self._error is None:
                self._error = versions.changed(r.tracked, r.key, self._obj)
            r.tracked = None

    def finish_staging(self) -> None:
        """Complete deferred CPU copies and wait for device copies (writer thread).

        Raises the first failed copy, or :class:`~torchaux.errors.TensorChangedError`
        when a tensor changed between the call and its copy.  Always releases
        the fences, also when a copy fails, so a training thread blocked in a
        fence can never deadlock on a failed save.
        """
        try:
            if self._deferred:
                self._copy_upto(len(self._order), on_writer=True)
            for dev in self._devices:
                dev.all_done.synchronize()
            if self._deferred and self._devices:
                with self._copy_lock:
                    self._check_devices()
            if self._error is not None:
                raise self._error
        finally:
            with self._copy_lock:
                for r in self._records:
                    r.source = None  # live storages may now be freed by their owner
                    r.tracked = None
                self._obj = None
                self._buffers_ready.set()
                self._all_ready.set()

    # -- fences (training thread) ------------------------------------------

    def fence_upto(self, n: int, *, devices: bool = True) -> None:
        """Order what follows after the first ``n`` deferred copies (and every device copy).

        Copies still pending are done here, on the calling thread: a fence
        never waits for the writer to reach this snapshot.
        """
        if self._all_ready.is_set():
            return
        if self._cursor < n:
            start = time.perf_counter()
            self._copy_upto(n)
            _fence_blocked[0] += time.perf_counter() - start
        if devices and self._devices:
            with self._copy_lock:
                self._check_devices()
            for dev in self._devices:
                device_module(dev.device).current_stream(dev.device).wait_event(dev.all_done)

    def fence_forward(self) -> None:
        """Order the next forward after the copies of the early (model) group."""
        self.fence_upto(sum(1 for i in self._order if self._records[i].is_buffer))

    def fence_all(self) -> None:
        """Order everything after this point after every copy of the snapshot."""
        self.fence_upto(len(self._order))

    def is_staged(self) -> bool:
        """True once every byte is on the host (host side only; never blocks)."""
        return self._all_ready.is_set()

    def release(self, pool: HostBufferPool) -> None:
        """Return the host buffers to ``pool``; the snapshot is unusable after."""
        if not self.skip_data:  # placeholders were never the pool's
            pool.release(r.staged for r in self._records)
        self._records = []
        self._by_key = None
