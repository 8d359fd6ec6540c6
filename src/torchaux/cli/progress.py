"""A one-line stderr progress bar for reading, decrypting and writing large checkpoints.

The bar shows a label (a file name), the percentage, MiB done of the total and
the rate in MiB/s; it redraws in place with ``\\r`` at most every
:data:`REDRAW_INTERVAL_S` seconds and ends with a newline.  It knows byte
counts and the label only, so it cannot show key material.  By default it is
drawn only when stderr is a terminal and the file is at least
:data:`AUTO_MIN_BYTES`; ``--progress`` forces it (tests do) and
``--no-progress`` turns it off.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

__all__ = [
    "Progress",
    "ProgressReader",
    "ProgressWriter",
    "progress_enabled",
    "AUTO_MIN_BYTES",
    "REDRAW_INTERVAL_S",
]

#: Smallest file that gets a bar without ``--progress`` (smaller ones finish
#: before a bar would tell the user anything).
AUTO_MIN_BYTES = 64 << 20
#: Seconds between redraws (a terminal redraw per chunk would cost more than it shows).
REDRAW_INTERVAL_S = 0.1
_MIB = float(1 << 20)


def progress_enabled(flag: bool | None, total: int, stream: IO[str] | None = None) -> bool:
    """Whether to draw: ``flag`` if given, else a terminal stderr and a large file.

    Example:
        >>> import io
        >>> progress_enabled(None, 1 << 40, io.StringIO()), progress_enabled(True, 0)
        (False, True)
    """
    if flag is not None:
        return flag
    out = sys.stderr if stream is None else stream
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and total >= AUTO_MIN_BYTES


class Progress:
    """Counts bytes and draws the bar on ``stream`` (default stderr) if ``enabled``.

    Safe to update from one writer thread while another thread waits; use as
    a context manager, which draws the final line.

    Args:
        label: what is being processed (shown before the numbers).
        total: expected byte count; ``None`` or 0 shows no percentage.
        enabled: draw at all (a disabled bar only counts).
        stream: text stream to draw on (default: ``sys.stderr`` at draw time).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress("x.ckpt", total=2 << 20, enabled=True, stream=out) as bar:
        ...     bar.update(2 << 20)
        >>> out.getvalue().rsplit("\\r", 1)[1].split()[:3]
        ['x.ckpt', '100.0%', '2.0/2.0']
    """

    def __init__(
        self, label: str, total: int | None, *, enabled: bool, stream: IO[str] | None = None
    ) -> None:
        self.label = label
        self.total = total or None
        self.done = 0
        self.enabled = enabled
        self._stream = stream
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._lock = threading.Lock()
        self._closed = False
        self._width = 0

    def update(self, n: int) -> None:
        """Add ``n`` processed bytes; redraw if the last redraw is old enough."""
        with self._lock:
            self.done += n
            if self.enabled and not self._closed:
                now = time.monotonic()
                if now - self._last_draw >= REDRAW_INTERVAL_S:
                    self._last_draw = now
                    self._draw(now, final=False)

    def close(self) -> None:
        """Draw the final line (100% if the total was reached) and stop drawing."""
        with self._lock:
            if self.enabled and not self._closed:
                self._draw(time.monotonic(), final=True)
            self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self, now: float, *, final: bool) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / _MIB / elapsed
        if self.total:
            # The total of a write is an estimate: hold 99.9% until it ends.
            pct = min(100.0 * self.done / self.total, 100.0 if final else 99.9)
            numbers = f"{pct:5.1f}% {self.done / _MIB:6.1f}/{self.total / _MIB:.1f} MiB"
        else:
            numbers = f"{self.done / _MIB:6.1f} MiB"
        line = f"{self.label} {numbers} {rate:7.1f} MiB/s"
        # Pad over the rest of a longer previous line (the numbers shrink at times).
        padded, self._width = line.ljust(self._width), max(self._width, len(line))
        stream = sys.stderr if self._stream is None else self._stream
        stream.write("\r" + padded + ("\n" if final else ""))
        stream.flush()


class ProgressReader:
    """A binary file wrapper whose ``read``/``readinto`` report bytes to a :class:`Progress`.

    Example:
        >>> import io
        >>> bar = Progress("f", 4, enabled=False)
        >>> ProgressReader(io.BytesIO(b"abcd"), bar).read(3), bar.done
        (b'abc', 3)
    """

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self._raw = raw
        self._progress = progress
        self.name = getattr(raw, "name", None)

    def read(self, size: int = -1) -> bytes:
        """Read like ``raw.read`` and count the bytes."""
        data = self._raw.read(size)
        self._progress.update(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        """Read like ``raw.readinto`` and count the bytes."""
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        self._progress.update(n or 0)
        return int(n or 0)


class ProgressWriter:
    """A binary file wrapper whose ``write`` reports bytes to a :class:`Progress`.

    Everything but ``write`` goes to the wrapped file unchanged.

    Example:
        >>> import io
        >>> bar = Progress("f", None, enabled=False)
        >>> ProgressWriter(io.BytesIO(), bar).write(b"abc"), bar.done
        (3, 3)
    """

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def write(self, data: Any) -> int:
        """Write like ``raw.write`` and count the bytes."""
        n = self._raw.write(data)
        self._progress.update(memoryview(data).nbytes if n is None else n)
        return memoryview(data).nbytes if n is None else n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
