"""`python -m torchaux.cli.bench.engine`: the engine's own costs, without a training loop.

* **writer CPU**: CPU seconds of torchaux's background threads per GiB saved
  (:func:`~torchaux.checkpoint.cpu_time.background_cpu_seconds`), direct I/O and
  buffered, four saves of a warm ``--size-mib`` state;
* **first save**: in fresh processes, the stall of the first save against the
  steady stall, into a cold pool and after :meth:`AsyncSaver.prepare`.

Figures: docs/benchmarks.md §8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

__all__ = ["writer_cpu_per_gib", "first_save", "main"]


def _state(size_mib: int) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.randn(size_mib * (1 << 20) // 4 // 8) for i in range(8)}


def writer_cpu_per_gib(size_mib: int, directory: str, *, direct_io: bool, saves: int = 4) -> float:
    """Background CPU seconds per GiB over ``saves`` saves after a warm-up save.

    >>> writer_cpu_per_gib(8, doctest_tmp, direct_io=True, saves=1) > 0
    True
    """
    import torchaux
    from torchaux import _knobs
    from torchaux.checkpoint.cpu_time import background_cpu_seconds

    state = _state(size_mib)
    saver = torchaux.AsyncSaver(name="bench-engine")
    try:
        with _knobs.override(direct_io=int(direct_io)):
            torchaux.save_async(state, os.path.join(directory, "warm.pt"), saver=saver).wait()
            before = background_cpu_seconds()
            for i in range(saves):
                torchaux.save_async(state, os.path.join(directory, f"s{i}.pt"), saver=saver).wait()
            spent = background_cpu_seconds() - before
    finally:
        saver.close()
    return spent / (saves * size_mib / 1024)


def _first_save_child(size_mib: int, directory: str, prepare: bool) -> dict[str, float]:
    import torchaux

    state = _state(size_mib)
    saver = torchaux.AsyncSaver(name="bench-first")
    start = time.perf_counter()
    if prepare:
        saver.prepare(state)
    prepare_s = time.perf_counter() - start
    stalls = []
    for i in range(4):
        start = time.perf_counter()
        handle = torchaux.save_async(state, os.path.join(directory, f"f{i}.pt"), saver=saver)
        stalls.append(time.perf_counter() - start)
        handle.wait()
    saver.close()
    steady = statistics.median(stalls[1:])
    return {"prepare_s": prepare_s, "first_s": stalls[0], "steady_s": steady,
            "ratio": stalls[0] / steady}


def first_save(size_mib: int, directory: str, *, prepare: bool) -> dict[str, float]:
    """First and steady stall of a fresh process (``prepare``: after ``saver.prepare``)."""
    code = (
        "import json, sys; from torchaux.cli.bench.engine import _first_save_child; "
        f"print(json.dumps(_first_save_child({size_mib}, {directory!r}, {prepare!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchaux.cli.bench.engine", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dir", default=None, help="directory for the files (default: temp)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per first-save mode")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="torchaux-engine-", dir=args.dir)
    try:
        for direct in (True, False):
            cpu = writer_cpu_per_gib(args.size_mib, root, direct_io=direct)
            print(f"writer CPU, {'direct I/O' if direct else 'buffered '}: {cpu:.3f} s per GiB")
        for _ in range(args.repeat):
            for prepare in (False, True):
                r = first_save(args.size_mib, root, prepare=prepare)
                print(f"first save {'after prepare' if prepare else 'cold pool    '}: "
                      f"{r['first_s']:.3f} s, steady {r['steady_s']:.3f} s, "
                      f"x{r['ratio']:.2f} (prepare {r['prepare_s']:.3f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
