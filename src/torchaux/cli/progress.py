"""Progress bars for reading, decrypting and writing large checkpoints, drawn by tqdm.

tqdm (an optional dependency: ``pip install torchaux[cli]``) draws the bar, with
rate, ETA and terminal-width handling; without it the commands work the same
and draw nothing.  A bar knows byte counts and a label (a file name) only, so
it cannot show key material.  By default it is drawn only when stderr is a
terminal and the file is at least :data:`AUTO_MIN_BYTES`; ``--progress``
forces it (tests do) and ``--no-progress`` turns it off.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import IO, Any

__all__ = [
    "Progress",
    "ProgressReader",
    "ProgressWriter",
    "progress_enabled",
    "tqdm_available",
    "AUTO_MIN_BYTES",
    "REDRAW_INTERVAL_S",
]

#: Smallest file that gets a bar without ``--progress`` (smaller ones finish
#: before a bar would tell the user anything).
AUTO_MIN_BYTES = 64 << 20
#: Seconds between redraws (tqdm's ``mininterval``; a redraw per chunk would cost more than it shows).
REDRAW_INTERVAL_S = 0.1


def tqdm_available() -> bool:
    """Whether tqdm can be imported (no bar is drawn without it).

    Example:
        >>> isinstance(tqdm_available(), bool)
        True
    """
    try:
        importlib.import_module("tqdm")
    except ImportError:
        return False
    return True


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
    """Counts bytes and, if ``enabled`` and tqdm is installed, draws a tqdm bar on ``stream``.

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
        >>> bar.done, ("100%" in out.getvalue()) == tqdm_available()
        (2097152, True)
    """

    def __init__(
        self, label: str, total: int | None, *, enabled: bool, stream: IO[str] | None = None
    ) -> None:
        self.label = label
        self.total = total or None
        self.done = 0
        self.enabled = enabled
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # optional: the command works the same without a bar
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=self.total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                    file=sys.stderr if stream is None else stream,
                    mininterval=REDRAW_INTERVAL_S, leave=True, dynamic_ncols=True,
                )

    def update(self, n: int) -> None:
        """Add ``n`` processed bytes (tqdm redraws at most every :data:`REDRAW_INTERVAL_S`)."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                if self._bar.total is not None and self.done > self._bar.total:
                    # The total of a write is an estimate: grow it rather than show > 100%.
                    self._bar.total = self.done
                self._bar.update(n)

    def close(self) -> None:
        """Draw the final line and stop drawing (idempotent)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

    def write_retained(self, data: memoryview, address: int) -> int:
        """``raw.write_retained`` (a direct-I/O file's in-place write), counted; else ``write``."""
        retained = getattr(self._raw, "write_retained", None)
        n = retained(data, address) if retained is not None else self._raw.write(data)
        self._progress.update(len(data))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
