"""`python -m torchaux.cli.bench.dumps`: what a ``save_graph_tensor`` dump costs the caller.

For 1 KB, 1 MiB and 4 MiB tensors: the median time the calling thread spends
in ``save_graph_tensor`` against a synchronous ``torch.save`` of the same
tensor, measured in the same run (then the time until every dump is written),
and a compiled step with 20 dumps against the same step without them.

Example:
    >>> rows = measure(doctest_tmp, sizes=(1024,), count=3, compiled=False)
    >>> rows[0]["bytes"], rows[0]["ratio"] > 0
    (1024, True)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import torchaux

__all__ = ["measure", "main"]

SIZES = (1 << 10, 1 << 20, 4 << 20)


def _median_call(fn: Any, count: int) -> float:
    times = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(directory: str, *, sizes: Sequence[int] = SIZES, count: int = 200,
            compiled: bool = True) -> list[dict[str, Any]]:
    """Rows of caller cost per dump against torch.save, and the compiled-step row."""
    rows: list[dict[str, Any]] = []
    torchaux.save_graph_tensor(torch.ones(1), os.path.join(directory, "warm.pt"))  # first-use costs
    torchaux.wait_saves()
    for nbytes in sizes:
        t = torch.randn(nbytes // 4)
        n = max(10, count if nbytes <= 1 << 20 else count // 10)
        dump = _median_call(lambda i: torchaux.save_graph_tensor(
            t, os.path.join(directory, f"d{nbytes}.pt")), n)
        start = time.perf_counter()
        torchaux.wait_saves()
        drained = time.perf_counter() - start
        save = _median_call(lambda i: torch.save(t, os.path.join(directory, f"s{nbytes}_{i}.pt")), n)
        rows.append({"bytes": nbytes, "dumps": n, "dump_s": dump, "torch_save_s": save,
                     "ratio": dump / save, "drain_after_s": drained})
    if compiled:
        rows.append(_compiled_row(directory))
    return rows


def _compiled_row(directory: str) -> dict[str, Any]:
    def body(x: torch.Tensor, dump: bool) -> torch.Tensor:
        for i in range(20):
            x = x * 1.01
            if dump:
                torchaux.save_graph_tensor(x, os.path.join(directory, f"layer{i}.pt"))
        return x.sum()

    with_dumps = torch.compile(lambda x: body(x, True), backend="aot_eager", fullgraph=True)
    without = torch.compile(lambda x: body(x, False), backend="aot_eager", fullgraph=True)
    x = torch.randn(1 << 18)
    with_dumps(x), without(x)
    torchaux.wait_saves()
    plain = _median_call(lambda i: without(x), 20)
    dumped = _median_call(lambda i: with_dumps(x), 20)
    torchaux.wait_saves()
    return {"bytes": x.numel() * 4, "dumps": 20, "step_s": plain, "step_with_dumps_s": dumped,
            "ratio": dumped / plain}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; ``--dir`` chooses where dumps go (default: a temp directory)."""
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m torchaux.cli.bench.dumps", description=__doc__)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        rows = measure(d, count=args.count)
    print("| tensor | caller per dump | torch.save | ratio | written after |")
    print("|---|---|---|---|---|")
    for r in rows[:-1]:
        print(f"| {r['bytes']} B | {r['dump_s'] * 1e6:.0f} µs | {r['torch_save_s'] * 1e6:.0f} µs "
              f"| {r['ratio']:.3f} | {r['drain_after_s'] * 1e3:.0f} ms |")
    c = rows[-1]
    print(f"\ncompiled step (aot_eager), 20 dumps of {c['bytes']} B: {c['step_with_dumps_s'] * 1e3:.2f} ms "
          f"vs {c['step_s'] * 1e3:.2f} ms without ({c['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
