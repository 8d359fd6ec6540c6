"""Per-thread CPU binding: keep busy helper threads off the training thread's cores.

A background thread that serialises a checkpoint, or a data-loading thread,
competes with the training thread for CPU time.  Pinning the helper to other
cores (and optionally the trainer to its own) stops that.  torch_npu offers
``torch_npu.utils.set_thread_affinity`` / ``reset_thread_affinity`` for this;
this module gives the same calls, with the same argument forms and errors, on
every Linux machine and every backend.

Semantics (Linux ``sched_setaffinity(2)``: pid 0 means the *calling thread*;
Python's docs say "process", but the kernel binds only the thread that asks):

* :func:`set_thread_affinity` binds the calling thread only.  Threads created
  afterwards inherit its mask; threads that already exist (including PyTorch's
  OpenMP intra-op workers, created on the first parallel op) keep theirs.  To
  pin those, set ``OMP_PROC_BIND``/``OMP_PLACES`` or bind before the first op.
* :func:`reset_thread_affinity` restores the mask the thread had before its
  last :func:`set_thread_affinity` (a per-thread stack), and does nothing if
  there is none.  :func:`thread_affinity` is the same pair as a ``with`` block.
* Differences from torch_npu (Ascend/pytorch ``torch_npu/utils/affinity.py``
  and ``csrc/core/npu/NPUAffinityController.cpp``): torch_npu does nothing at
  all unless the environment variable ``CPU_AFFINITY_CONF`` selects mode 1 or 2
  (and its conflict check passes); here no environment variable is read, and
  ``CPU_AFFINITY_CONF`` is ignored.  torch_npu's ``reset`` binds the thread to
  the device's "main thread" cores and its ``None`` to the device's "other"
  cores; here ``reset`` restores the previous mask and ``None`` binds to
  :func:`available_cores` (what torch_npu's coarse mode gives any thread of a
  single-device process).  torch_npu logs and ignores a failed binding; here an
  impossible one raises ``ValueError``.
* Without per-thread affinity (macOS, Windows: no ``os.sched_setaffinity``)
  every call validates its argument, then warns and does nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import warnings
from collections.abc import Iterable, Iterator

__all__ = [
    "set_thread_affinity",
    "reset_thread_affinity",
    "thread_affinity",
    "get_thread_affinity",
    "available_cores",
    "cores_excluding",
]

#: ``[start, end]`` (inclusive) or ``[[start, end], ...]``, as torch_npu accepts.
CoreRange = list[int] | list[list[int]]


def _snapshot_cores() -> frozenset[int]:
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


# Read once, at import, from the importing thread (normally the main thread
# before anyone pinned anything).  Per-thread masks change later; this is the
# set a thread may return to.  It honours cgroup/taskset limits, unlike
# os.cpu_count() (research note C.1).
_PROCESS_CORES = _snapshot_cores()

_local = threading.local()


def _previous_masks() -> list[set[int]]:
    """The calling thread's stack of masks to restore, oldest first."""
    stack: list[set[int]] | None = getattr(_local, "masks", None)
    if stack is None:
        stack = []
        _local.masks = stack
    return stack


def _supported() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def _warn_unsupported(what: str) -> None:
    warnings.warn(
        f"{what} does nothing here: this platform has no per-thread CPU affinity "
        "(os.sched_setaffinity is Linux-only); the thread keeps its current cores.",
        RuntimeWarning,
        stacklevel=3,
    )


def _parse(core_range: CoreRange) -> list[tuple[int, int]]:
    """Validate torch_npu's argument forms; return inclusive ``(start, end)`` pairs."""
    if isinstance(core_range, list) and len(core_range) == 2 and all(
        isinstance(v, int) for v in core_range
    ):
        pairs: list[list[object]] = [list(core_range)]
    elif (
        isinstance(core_range, list)
        and core_range
        and all(isinstance(item, list) and len(item) == 2 for item in core_range)
    ):
        pairs = [list(item) for item in core_range]  # type: ignore[arg-type]
    else:
        # The leading words match torch_npu's message, which its tests look for.
        raise ValueError(
            f"Invalid core range: {core_range!r}; expected None, a list [start, end] or a "
            "non-empty list of such lists, e.g. [0, 3] or [[0, 1], [4, 5]] (inclusive)."
        )
    checked: list[tuple[int, int]] = []
    for start, end in pairs:
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(
                f"Invalid core range values: [{start!r}, {end!r}]; expected ints with "
                "0 <= start <= end, e.g. [2, 5] for cores 2, 3, 4 and 5."
            )
        checked.append((start, end))
    return checked


def _expand(pairs: list[tuple[int, int]]) -> set[int]:
    """Union of the ranges, without ids the machine cannot have (torch_npu drops them too)."""
    limit = os.cpu_count() or (max(_PROCESS_CORES) + 1)
    # Clamp before expanding: [0, 10**9] must not build a billion-element set.
    cores = {c for start, end in pairs for c in range(start, min(end, limit - 1) + 1)}
    if any(end >= limit for _, end in pairs):
        warnings.warn(
            f"core ids >= {limit} ignored: this machine has {limit} CPUs "
            f"(requested ranges {[list(p) for p in pairs]}).",
            RuntimeWarning,
            stacklevel=3,
        )
    return cores


def _bind(cores: set[int]) -> None:
    """Bind the calling thread to ``cores``; fail if none of them is usable."""
    if not cores:
        raise ValueError(
            f"no core to bind to: every requested id is >= the {os.cpu_count()} CPUs of this "
            f"machine; choose from available_cores() = {available_cores()}."
        )
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # EINVAL: no requested core is online and allowed by the cpuset.
        raise ValueError(
            f"cannot bind this thread to cores {sorted(cores)}: none of them is available "
            f"to this process (available: {available_cores()}); choose from "
            "available_cores()."
        ) from exc
    dropped = cores - os.sched_getaffinity(0)
    if dropped:
        # The kernel silently intersects with the cgroup/taskset cpuset.
        warnings.warn(
            f"cores {sorted(dropped)} are not available to this process and were skipped; "
            f"the thread is bound to {sorted(os.sched_getaffinity(0))}.",
            RuntimeWarning,
            stacklevel=3,
        )


def available_cores() -> list[int]:
    """Return the cores this process could use when torchaux was imported.

    This honours ``taskset`` and cgroup limits (it is the importing thread's
    mask), unlike ``os.cpu_count()``.

    Returns:
        Sorted core ids.

    Example:
        >>> cores = available_cores()
        >>> cores == sorted(cores) and len(cores) >= 1
        True
    """
    return sorted(_PROCESS_CORES)


def get_thread_affinity(native_id: int | None = None) -> list[int]:
    """Return the cores a thread may run on.

    Args:
        native_id: kernel thread id (``threading.get_native_id()`` in that
            thread, or ``Thread.native_id``); ``None`` for the calling thread.

    Returns:
        Sorted core ids (:func:`available_cores` where the platform cannot tell).

    Example:
        >>> set(get_thread_affinity()) <= set(range(os.cpu_count() or 1))
        True
    """
    if not _supported():
        return available_cores()
    return sorted(os.sched_getaffinity(0 if native_id is None else native_id))


def set_thread_affinity(core_range: CoreRange | None = None) -> None:
    """Bind the calling thread to a set of cores, remembering its current mask.

    Threads the caller starts afterwards inherit the binding, so torch_npu's
    pattern works: set, start a worker, :func:`reset_thread_affinity`.

    Args:
        core_range: ``[start, end]`` (inclusive), a non-empty list of such
            pairs (overlaps are merged), or ``None`` for every core in
            :func:`available_cores`.

    Raises:
        ValueError: the argument is not one of those forms ("Invalid core
            range"), a pair is not ``0 <= start <= end`` ("Invalid core range
            values"), or no requested core is available to the process.

    Warns:
        RuntimeWarning: some requested cores do not exist or are not available
            and were skipped; or the platform has no per-thread affinity.

    Example:
        >>> first = available_cores()[0]
        >>> set_thread_affinity([first, first])
        >>> get_thread_affinity() == [first]
        True
        >>> reset_thread_affinity()
    """
    cores = None if core_range is None else _expand(_parse(core_range))
    if not _supported():
        _warn_unsupported("set_thread_affinity")
        return
    previous = os.sched_getaffinity(0)
    _bind(set(_PROCESS_CORES) if cores is None else cores)
    _previous_masks().append(previous)


def reset_thread_affinity() -> None:
    """Restore the mask the calling thread had before its last :func:`set_thread_affinity`.

    Calls nest: each reset undoes one set, most recent first.  With no set to
    undo (or on a thread that never called it) this does nothing.

    Example:
        >>> before = get_thread_affinity()
        >>> set_thread_affinity([before[0], before[0]])
        >>> reset_thread_affinity()
        >>> get_thread_affinity() == before
        True
    """
    if not _supported():
        _warn_unsupported("reset_thread_affinity")
        return
    stack = _previous_masks()
    if stack:
        os.sched_setaffinity(0, stack.pop())


@contextlib.contextmanager
def thread_affinity(core_range: CoreRange | None = None) -> Iterator[list[int]]:
    """Bind the calling thread for the duration of a ``with`` block.

    On exit the thread gets back the exact mask it had on entry, even if the
    block raised or called :func:`set_thread_affinity` without resetting.

    Args:
        core_range: as for :func:`set_thread_affinity`.

    Yields:
        The cores the thread is bound to inside the block.

    Raises:
        ValueError: as for :func:`set_thread_affinity`.

    Example:
        >>> before = get_thread_affinity()
        >>> with thread_affinity([before[-1], before[-1]]) as cores:
        ...     cores == [before[-1]]
        True
        >>> get_thread_affinity() == before
        True
    """
    stack = _previous_masks()
    depth = len(stack)
    set_thread_affinity(core_range)
    try:
        yield get_thread_affinity()
    finally:
        if _supported() and len(stack) > depth:
            mask = stack[depth]
            del stack[depth:]
            os.sched_setaffinity(0, mask)


def cores_excluding(
    cores: Iterable[int], *, available: Iterable[int] | None = None
) -> list[list[int]]:
    """Return the available cores outside ``cores``, as ranges for :func:`set_thread_affinity`.

    Meant for a background thread (the checkpoint writer) that should stay off
    the training thread's cores: read the trainer's cores with
    :func:`get_thread_affinity` on the training thread, then bind the helper
    thread to the rest.  When nothing is left (the trainer may use every
    core) the result is ``[]``: leave the helper unpinned, since binding it to
    the trainer's cores gains nothing.

    Args:
        cores: core ids to keep free (any iterable, e.g. a set).
        available: cores to choose from; default :func:`available_cores`.

    Returns:
        Merged inclusive ranges, ascending, e.g. ``[[1, 3], [6, 7]]``; ``[]``
        when no core is left.

    Example:
        >>> cores_excluding({0, 4, 5}, available=range(8))
        [[1, 3], [6, 7]]
        >>> cores_excluding(range(4), available=range(4))
        []
        >>> spare = cores_excluding(get_thread_affinity())  # in the training thread
        >>> if spare:  # then, in the helper thread:
        ...     with thread_affinity(spare):
        ...         pass
    """
    pool = set(available_cores() if available is None else available)
    remaining = sorted(pool - set(cores))
    ranges: list[list[int]] = []
    for core in remaining:
        if ranges and ranges[-1][1] == core - 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ranges
