"""What `torchaux bench` measures a run with: state fingerprints and peak RSS.

:func:`fingerprint` tells whether a loaded checkpoint equals the state at
its step; :class:`RssSampler` records the peak resident set size of a block.
"""

from __future__ import annotations

import ctypes
import os
import threading
import zlib
from typing import Any

import torch

__all__ = ["fingerprint", "RssSampler"]


def fingerprint(state: dict[str, Any]) -> list[tuple[str, int]]:
    """CRC-32 of every tensor's bytes, in a fixed order (for equality checks only).

    >>> fingerprint({"a": {"b": torch.tensor([1])}}) == fingerprint({"a.b": torch.tensor([1])})
    True
    >>> fingerprint({"w": torch.tensor([1])}) == fingerprint({"w": torch.tensor([2])})
    False
    """
    out: list[tuple[str, int]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if hasattr(value, "to_local"):  # a DTensor: this rank's shard, on any device
                value = value.to_local()
            data = value.detach().cpu().contiguous().view(-1).view(torch.uint8)
            # A zero-copy byte view of the CPU tensor (no numpy dependency);
            # `data` stays referenced while the view is read.
            view = (ctypes.c_char * data.numel()).from_address(data.data_ptr())
            out.append((prefix, zlib.crc32(memoryview(view)) if data.numel() else 0))
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}.{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("", state)
    return sorted(out)  # flat ("a.b") and nested ({"a": {"b"}}) states compare equal


class RssSampler:
    """Peak resident set size during a block, sampled every 2 ms (Linux ``/proc``).

    >>> with RssSampler() as rss:
    ...     block = bytearray(8 << 20)
    >>> rss.peak >= rss.base
    True
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def rebase(self) -> None:
        """Measure growth from now on (after the training state exists)."""
        self.base = self.rss()
        self.peak = self.base

    def __enter__(self) -> RssSampler:
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
