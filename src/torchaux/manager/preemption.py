"""Opt-in preemption notice: a SIGTERM/SIGUSR1 handler that only sets a flag.

Schedulers announce preemption with a signal (Slurm sends SIGTERM, or a
chosen signal with ``--signal``; Kubernetes sends SIGTERM before the grace
period ends).  The handler does nothing but record the signal: saving from a
signal handler could interrupt the training step half-way, so the manager
saves at the next ``save()`` call instead and waits until it is durable.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["PreemptionWatcher", "DEFAULT_SIGNALS", "parse_signals"]

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)


class PreemptionWatcher:
    """Installs flag-setting handlers for ``signals``; :meth:`uninstall` restores the old ones.

    Example:
        >>> import os, signal
        >>> w = PreemptionWatcher([signal.SIGUSR1])
        >>> os.kill(os.getpid(), signal.SIGUSR1)
        >>> w.wait(5.0), w.received
        (True, <Signals.SIGUSR1: 10>)
        >>> w.uninstall()
    """

    def __init__(self, signals: Iterable[signal.Signals | int] = DEFAULT_SIGNALS) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "preemption signals can only be watched from the main thread (Python runs "
                "signal handlers there); create the CheckpointManager on the main thread"
            )
        self._signals = [signal.Signals(s) for s in signals]
        if not self._signals:
            raise ValueError("preemption needs at least one signal, e.g. [signal.SIGTERM]")
        self._event = threading.Event()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        self._event.set()

    @property
    def triggered(self) -> bool:
        """Whether a watched signal arrived."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a watched signal arrives; return whether it did."""
        return self._event.wait(timeout)

    def uninstall(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def parse_signals(preemption: object) -> list[signal.Signals]:
    """The signals ``preemption=`` asks for: False (none), True (the defaults) or a list.

    >>> parse_signals(True) == list(DEFAULT_SIGNALS), parse_signals(False)
    (True, [])
    """
    if preemption is False:
        return []
    if preemption is True:
        chosen: Iterable[Any] = DEFAULT_SIGNALS
    elif isinstance(preemption, (str, bytes)) or not isinstance(preemption, Iterable):
        raise TypeError(
            f"preemption must be a bool or a list of signals; got {type(preemption).__name__}"
        )
    else:
        chosen = preemption
    out = []
    for sig in chosen:
        try:
            out.append(signal.Signals(sig))
        except (ValueError, TypeError):
            raise ValueError(f"preemption: {sig!r} is not a signal (e.g. signal.SIGTERM)") from None
    if threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "preemption signals can only be watched from the main thread (Python runs signal "
            "handlers there); create the CheckpointManager on the main thread"
        )
    return out
