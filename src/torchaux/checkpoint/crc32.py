"""CRC-32 (the zip and zlib polynomial) at SIMD speed, for every CRC torchaux computes.

zip records, the integrity member, safetensors CRCs, distributed shard checksums and
the loaders' checks all call :func:`crc32`.  It is zlib-ng's (the ``zlib-ng`` package,
a declared dependency: maintained bindings of the zlib-ng library, whose CRC-32 uses
PCLMULQDQ/VPCLMULQDQ folding on x86-64 and the ARMv8 CRC instructions on aarch64).

Chosen by measurement on the 2-core reference VM (2026-12-02, 256 MiB of random bytes,
best of 5; ``python -m torchaux.checkpoint.crc32``): zlib 6.3 GB/s, python-isal 32.7 GB/s,
zlib-ng 32.0 GB/s, the same values; on 10^5 records of 64 bytes zlib-ng took 6.1 ms,
isal 6.9 ms, zlib 16.6 ms.  Both SIMD libraries release the GIL like zlib; zlib-ng won
on small records and ties on large ones.

When ``zlib_ng`` cannot be imported (a platform without its wheel), :func:`crc32` is
``zlib.crc32``: the same values, about 5x slower.  ``BACKEND`` says which one runs;
``torchaux bench`` reports it.

>>> crc32(b"hello") == 0x3610A686
True
>>> crc32(b"lo", crc32(b"hel")) == crc32(b"hello")
True
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Union

# collections.abc.Buffer is Python >= 3.12; the project supports 3.10+.
Buffer = Union[bytes, bytearray, memoryview]

__all__ = ["BACKEND", "crc32"]

_impl: Callable[..., int]
try:
    from zlib_ng.zlib_ng import crc32 as _impl

    BACKEND = "zlib-ng"
except ImportError:  # documented fallback: same values, zlib's speed
    _impl = zlib.crc32
    BACKEND = "zlib"


def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 of ``data`` (any contiguous buffer), continuing from ``value``."""
    return _impl(data, value)


def _measure() -> None:  # pragma: no cover - the figure in the module docstring
    import os
    import time

    data = memoryview(os.urandom(256 << 20))
    candidates: dict[str, Callable[..., int]] = {"zlib": zlib.crc32}
    try:
        from zlib_ng.zlib_ng import crc32 as ng

        candidates["zlib-ng"] = ng
    except ImportError:
        pass
    try:
        from isal.isal_zlib import crc32 as isal

        candidates["isal"] = isal
    except ImportError:
        pass
    for name, fn in candidates.items():
        best = min(_timed(fn, data, time.perf_counter) for _ in range(5))
        print(f"{name:8s} {len(data) / best / 1e9:5.1f} GB/s  {fn(data):#010x}")


def _timed(fn: Callable[..., int], data: memoryview, clock: Callable[[], float]) -> float:
    start = clock()
    fn(data)
    return clock() - start


if __name__ == "__main__":  # pragma: no cover
    _measure()
