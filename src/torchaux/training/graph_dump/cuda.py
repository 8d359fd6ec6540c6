"""Graph dumps recorded into CUDA graphs: a pinned staging buffer and a host node each.

A replayed CUDA graph runs device work only; no Python runs at replay.  A dump
that did its work in Python at capture time would therefore fire once, while
the graph is being captured (when no kernel has produced any value yet), and
never again.  So when :func:`torchaux.training.graph_dump.dump.save_graph_tensor`
runs on a capturing stream, :func:`record_dump` instead records two nodes into
the graph:

1. a device-to-host copy of the tensor into a pinned staging buffer owned by
   this dump (a memcpy node with a fixed host address);
2. a host node (``cuLaunchHostFunc``) whose callback runs on a CUDA driver
   thread at every replay, after the copy and before later work on the stream.

The callback passes a host view of the staging buffer to the writer, which
copies it into a buffer of its own before returning (so the next replay may
overwrite the staging buffer) and chooses a new file name for every replay.

Rules and costs, from the CUDA runtime documentation of ``cudaLaunchHostFunc``
and the failures collected in our research notes (B.4):

* The callback must not call CUDA.  It only reads host memory and queues a
  write; the cyclic garbage collector is paused while it runs, because a
  collection could free a CUDA tensor and call into CUDA from this thread.
* The callback runs Python, so it takes the GIL.  A thread that holds the GIL
  while it blocks on work queued after the dump (a C extension calling CUDA
  without releasing the GIL) deadlocks with it.  PyTorch's ``replay``,
  ``synchronize`` and tensor operations release the GIL (pytorch PR #132520).
* Later work on the stream waits for the callback: a memcpy of the tensor plus
  the wait for the GIL (up to the interpreter's switch interval, 5 ms).
* The callback object and every staging buffer live until the process exits.
  A graph may be replayed as long as it exists and torch 2.13 has no hook for
  a graph's destruction; freeing them earlier is the "only the first replay
  calls back" bug of cupy #9274 and NVIDIA/cuda-python #790.
* Pinned memory is allocated during capture with this thread's capture mode
  switched to relaxed (``cuThreadExchangeStreamCaptureMode``): pinned
  allocation is one of the calls that global and thread-local capture reject
  (pytorch PR #146924).

Only CUDA is handled here; ROCm and other accelerators raise a clear error
when a dump is captured.  The CUDA path needs a GPU and is tested only there.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["is_capturing", "record_dump", "synchronize_recorded_devices", "pop_failure"]

_log = logging.getLogger("torchaux")

# cuda.h: CUDA_SUCCESS and CU_STREAM_CAPTURE_MODE_RELAXED.
_CUDA_SUCCESS = 0
_CAPTURE_MODE_RELAXED = 2

# cuda.h: `typedef void (CUDA_CB *CUhostFn)(void *userData)`.
_HostFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Driver:
    """The two CUDA driver entry points the capture path needs."""

    def __init__(self) -> None:
        # The driver library is always present where CUDA works, whichever
        # runtime (CUDA 12 or 13) this torch build bundles.
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        self.launch_host_func: Any = lib.cuLaunchHostFunc
        self.launch_host_func.argtypes = [ctypes.c_void_p, _HostFn, ctypes.c_void_p]
        self.launch_host_func.restype = ctypes.c_int
        self.exchange_capture_mode: Any = lib.cuThreadExchangeStreamCaptureMode
        self.exchange_capture_mode.argtypes = [ctypes.POINTER(ctypes.c_int)]
        self.exchange_capture_mode.restype = ctypes.c_int


_driver_instance: _Driver | None = None


def _driver() -> _Driver:
    global _driver_instance
    if _driver_instance is None:
        _driver_instance = _Driver()
    return _driver_instance


def _check(result: int, call: str) -> None:
    if result != _CUDA_SUCCESS:
        raise RuntimeError(
            f"save_graph_tensor: {call} returned CUresult {result} during CUDA graph "
            "capture (expected 0, CUDA_SUCCESS); dump this tensor outside the captured "
            "region instead"
        )


@dataclass
class _Recorded:
    """One dump recorded into a graph: where its bytes land and who writes them."""

    staging: torch.Tensor  # pinned uint8 buffer, refilled by every replay
    dtype: torch.dtype
    shape: torch.Size
    on_replay: Callable[[torch.Tensor], None]

    def host_view(self) -> torch.Tensor:
        """The staging bytes seen as the dumped tensor (no copy)."""
        return self.staging.view(self.dtype).view(self.shape)


# Kept across importlib.reload: graphs captured before a reload still call the
# old trampoline with keys into this registry.
_recorded: dict[int, _Recorded] = globals().get("_recorded", {})
_keys: Iterator[int] = globals().get("_keys", itertools.count(1))
_devices: set[int] = globals().get("_devices", set())
_failures: list[BaseException] = globals().get("_failures", [])
_failures_lock: threading.Lock = globals().get("_failures_lock", threading.Lock())


def is_capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph.

    Never raises: ``torch.cuda.is_current_stream_capturing()`` raises on
    CPU-only builds, so the device type and CUDA availability come first.

    >>> is_capturing(torch.device("cpu"))
    False
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def _relaxed_capture_mode(driver: _Driver) -> Iterator[None]:
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    _check(driver.exchange_capture_mode(ctypes.byref(mode)), "cuThreadExchangeStreamCaptureMode")
    try:
        yield
    finally:
        # `mode` now holds the previous mode; swapping again restores it.
        _check(
            driver.exchange_capture_mode(ctypes.byref(mode)), "cuThreadExchangeStreamCaptureMode"
        )


def record_dump(tensor: torch.Tensor, on_replay: Callable[[torch.Tensor], None]) -> None:
    """Record a copy of ``tensor`` and a host callback into the graph being captured.

    At every replay ``on_replay`` receives a CPU tensor with ``tensor``'s dtype
    and shape holding the values of that replay; the view is only valid during
    the call, so ``on_replay`` must copy it before returning.

    Args:
        tensor: a CUDA tensor on a stream that is capturing.
        on_replay: called on a CUDA driver thread at every replay.

    Raises:
        RuntimeError: not a CUDA build (e.g. ROCm), or a driver call failed.
    """
    if torch.version.hip is not None:
        raise RuntimeError(
            "save_graph_tensor inside a captured graph needs CUDA's cuLaunchHostFunc; this "
            "is a ROCm build.  Dump the tensor outside the captured region"
        )
    driver = _driver()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        with _relaxed_capture_mode(driver):
            staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        staging = torch.empty(0, dtype=torch.uint8)
    record = _Recorded(staging, tensor.dtype, tensor.shape, on_replay)
    if nbytes:
        # Pinned destination: captured as a memcpy node with a fixed address.
        record.host_view().copy_(tensor.detach(), non_blocking=True)
    key = _register(record)
    _devices.add(tensor.device.index if tensor.device.index is not None else 0)
    stream = torch.cuda.current_stream(tensor.device).cuda_stream
    _check(driver.launch_host_func(stream, _TRAMPOLINE, key), "cuLaunchHostFunc")


def _register(record: _Recorded) -> int:
    """Keep ``record`` for the life of the process; return the host node's key."""
    key = next(_keys)
    _recorded[key] = record
    return key


def _on_host_node(key: int | None) -> None:
    # Runs on a CUDA driver thread at each replay; ctypes holds the GIL for us.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if key is None:  # ctypes passes NULL user data as None; our keys start at 1
            raise RuntimeError("save_graph_tensor: a CUDA host node fired without its key")
        record = _recorded[key]
        record.on_replay(record.host_view())
    except BaseException as exc:  # noqa: BLE001 - ctypes would print and drop it
        with _failures_lock:
            _failures.append(exc)
    finally:
        if gc_was_enabled:
            gc.enable()


_TRAMPOLINE: Any = globals().get("_TRAMPOLINE", _HostFn(_on_host_node))


def synchronize_recorded_devices() -> None:
    """Wait until every replay already queued has run its dump callbacks.

    A no-op until a dump has been recorded into a CUDA graph.  Devices whose
    current stream is capturing are skipped (synchronizing would break the
    capture).
    """
    for index in sorted(_devices):
        with torch.cuda.device(index):
            if torch.cuda.is_current_stream_capturing():
                continue
            torch.cuda.synchronize(index)


def pop_failure() -> BaseException | None:
    """Return (and forget) the first exception a dump callback raised, if any.

    Later failures are logged, not lost.
    """
    with _failures_lock:
        failures = list(_failures)
        _failures.clear()
    for extra in failures[1:]:
        _log.error("torchaux: another graph dump failed as well", exc_info=extra)
    return failures[0] if failures else None
