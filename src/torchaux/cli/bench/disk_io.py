"""`python -m torchaux.cli.bench.disk_io`: page cache against direct I/O for one large file.

Writes ``--size-mib`` of random bytes to a new file in ``--dir`` and fsyncs
it, alternating three ways per round: ordinary buffered writes (what
``torch.save`` does), and :class:`~torchaux.checkpoint.storage.direct_io.DirectFile`
with each buffer size of ``--buffer-mib``.  Reports the median wall time until
durable, throughput and process CPU seconds of each, so the direct-I/O default
(``TORCHAUX_DIRECT_IO_BUFFER_BYTES``) is backed by a measurement on the
machine at hand.  Every file is deleted, and ``os.sync()`` run, before the
next one is timed, so one file's writeback cannot bill the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from torchaux.checkpoint.storage.direct_io import DirectFile, enable_direct_io

__all__ = ["measure", "main"]

_PIECE = 4 << 20  # the size of the writes a serializer hands the file


def _buffered(fd: int, data: memoryview) -> None:
    with open(fd, "wb", closefd=False) as f:
        for i in range(0, len(data), _PIECE):
            f.write(data[i : i + _PIECE])


def _direct(buffer_bytes: int) -> Callable[[int, memoryview], None]:
    def write(fd: int, data: memoryview) -> None:
        if not enable_direct_io(fd):
            raise OSError("this file system refuses O_DIRECT; pick another --dir")
        f = DirectFile(fd, buffer_bytes=buffer_bytes)
        for i in range(0, len(data), _PIECE):
            f.write(data[i : i + _PIECE])
        f.finish()

    return write


def _supports_direct_io(directory: str) -> bool:
    with tempfile.TemporaryFile(dir=directory) as f:
        return enable_direct_io(f.fileno())


def measure(
    size_mib: int, directory: str, buffer_mib: Sequence[int] = (8, 16, 32), rounds: int = 3
) -> list[dict[str, Any]]:
    """Time write + fsync of ``size_mib`` per method; return one row per method (medians).

    The direct rows are left out where ``directory``'s file system refuses
    ``O_DIRECT`` (tmpfs, for one).

    >>> rows = measure(1, doctest_tmp, buffer_mib=(1,), rounds=1)
    >>> rows[0]["method"], rows[0]["seconds"] > 0
    ('buffered', True)
    """
    data = memoryview(os.urandom(size_mib << 20))
    methods: dict[str, Callable[[int, memoryview], None]] = {"buffered": _buffered}
    if _supports_direct_io(directory):
        for mib in buffer_mib:
            methods[f"direct {mib} MiB"] = _direct(mib << 20)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, write in methods.items():
            path = os.path.join(directory, "bench-io.bin")
            os.sync()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                write(fd, data)
                os.fsync(fd)
                runs[name].append((time.perf_counter() - wall0, time.process_time() - cpu0))
            finally:
                os.close(fd)
                os.unlink(path)
    rows = []
    for name, samples in runs.items():
        wall = statistics.median(s[0] for s in samples)
        rows.append({
            "method": name,
            "seconds": wall,
            "gb_per_s": len(data) / wall / 1e9,
            "cpu_s": statistics.median(s[1] for s in samples),
        })
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints a table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m torchaux.cli.bench.disk_io", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--buffer-mib", type=int, action="append", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="directory on the disk to test (default: temp)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="torchaux-io-", dir=args.dir) as directory:
        rows = measure(args.size_mib, directory, args.buffer_mib or (8, 16, 32), args.rounds)
    print(f"{args.size_mib} MiB written + fsynced, median of {args.rounds} rounds")
    for r in rows:
        print(f"  {r['method']:<14} {r['seconds']:6.2f}s  {r['gb_per_s']:5.2f} GB/s  "
              f"CPU {r['cpu_s']:.2f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
