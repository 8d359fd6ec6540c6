"""Moving a storage's bytes into its staged host buffer.

Host storages are copied at once (memmove for small ones); accelerator
storages go device-to-host on one long-lived side stream per device that
first waits on the caller's stream, each device's copies fenced by events.
Part of staging: only this package reads live tensors.
"""

from __future__ import annotations

import ctypes
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from torchaux.checkpoint.engine import versions

__all__ = ["Record", "DeviceCopy", "as_bytes", "copy_host", "device_module", "enqueue_device_copies"]


@dataclass
class Record:
    """One storage of a snapshot: where its bytes come from and go to."""

    key: str
    source: torch.UntypedStorage | None  # live storage; dropped once copied
    staged: torch.UntypedStorage
    is_buffer: bool = False  # copied early (the model's tensors, in forward order)
    tracked: list[versions.TrackedTensor] | None = None  # version counters at the call
    nbytes: int | None = None  # set when ``staged`` is a placeholder (skip_data)
    crc: int | None = None  # CRC-32 of ``staged``, when computed during the copy (crc_copies)
    on_device: bool = False  # ``source`` is an accelerator storage (its device, read once at staging)



@dataclass
class DeviceCopy:
    """Copies of one accelerator device, with the event that fences them."""

    device: torch.device
    buffers_done: Any = None  # device event after the early group
    all_done: Any = None  # device event after every copy


def as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    # A uint8 view over the whole storage: copying bytes keeps every dtype
    # (bf16, fp8, complex, bool, quantised payloads) bit-exact.
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


# Host copies below this size go through memmove: two tensor views and a
# copy_ cost ~3.5 us a storage, memmove ~0.5 us (10^5 small tensors: 0.38 s
# against 0.07 s here, engine review k_many.py); above it torch's copy_ splits
# the copy over threads.
_MEMMOVE_BYTES = 1 << 16


def copy_host(dst: torch.UntypedStorage, src: torch.UntypedStorage) -> None:
    """Copy a CPU storage's bytes into an equally sized host buffer."""
    nbytes = src.nbytes()
    if nbytes != dst.nbytes():
        # The live storage was resized after the call (copy_ raises the same way).
        raise RuntimeError(
            f"a storage of the object being saved changed size while it was staged: "
            f"{dst.nbytes()} bytes at the call, {nbytes} at the copy; do not resize "
            "tensors of a pending save (wait for handle.staged first)"
        )
    if nbytes < _MEMMOVE_BYTES:
        if nbytes:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
    else:
        as_bytes(dst).copy_(as_bytes(src))



def device_module(device: torch.device) -> Any:
    return torch.get_device_module(device.type)


_side_streams: dict[torch.device, Any] = {}
_side_streams_lock = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    # One long-lived copy stream per device (creating streams per save leaks
    # handles on some backends); created under a lock so two first saves
    # cannot race into two streams (a torch_npu flaw, spec §1 "Limits" 4).
    with _side_streams_lock:
        stream = _side_streams.get(device)
        if stream is None:
            stream = device_module(device).Stream(device)
            _side_streams[device] = stream
        return stream


def enqueue_device_copies(records: list[Record]) -> list[DeviceCopy]:
    by_device: dict[torch.device, list[Record]] = defaultdict(list)
    for r in records:
        if r.source is not None and r.on_device:
            by_device[r.source.device].append(r)
    copies = []
    for device, recs in by_device.items():
        module = device_module(device)
        ordered = sorted(recs, key=lambda r: not r.is_buffer)
        if not hasattr(module, "Stream"):
            # Backends without a stream API (e.g. MPS): blocking copies.
            for r in ordered:
                assert r.source is not None
                as_bytes(r.staged).copy_(as_bytes(r.source))
                r.source = None
            module.synchronize()
            continue
        side = _side_stream(device)
        # The copies must see every kernel the caller already queued (e.g. the
        # optimizer step just before the save): torch_npu omits this wait.
        side.wait_stream(module.current_stream(device))
        copy = DeviceCopy(device)
        with module.stream(side):
            for r in ordered:
                if not r.is_buffer and copy.buffers_done is None:
                    copy.buffers_done = side.record_event()
                assert r.source is not None
                as_bytes(r.staged).copy_(as_bytes(r.source), non_blocking=True)
            copy.all_done = side.record_event()
            if copy.buffers_done is None:
                copy.buffers_done = copy.all_done
        copies.append(copy)
    return copies
