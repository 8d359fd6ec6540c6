"""``torchaux bench --cuda``: device-to-host staging against the pinned-memcpy limit, loads onto the GPU.

Issue #12's GPU figures, all from one process and one run:

* **pinned memcpy**: ``host.copy_(dev, non_blocking=True)`` of one
  ``--size-mib`` buffer into pinned host memory, synchronized - the DMA
  limit staging can reach (pageable host memory beside it, for scale);
* **staging**: the engine's :func:`~torchaux.checkpoint.engine.staging.stage`
  of a state of that size into a warm :class:`HostBufferPool`, from the call
  until every byte is on the host (``finish_staging``), for one tensor and
  for 64 MiB tensors; the first (cold-pool) staging is reported apart;
* **save_async**: the public call on the same state, from the call until
  ``handle.staged`` resolves (the previous save committed before the call);
* **load onto the GPU**: ``torch.load(map_location="cuda")`` against
  ``torchaux.load(map_location="cuda")`` and ``load_checkpoint(map_location=
  "cuda")`` of a torch.save file of the 64 MiB-tensor state, page cache warm,
  alternating, medians, each synchronized;
* **model= stall**: a model of 256 MiB Linear layers with Adam (three times
  the parameters of state): a training step's time alone, with an eager
  ``save_async`` before it and with ``save_async(model=)`` before it.

Every rate is bytes / seconds (GB = 1e9 bytes).  Ratios are against the
pinned memcpy and torch.load of the same run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["main", "run_cuda", "format_cuda"]

_MIB = 1 << 20


def _sync() -> None:
    torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - start)
    return out


def _rate(nbytes: int, seconds: list[float]) -> dict[str, float]:
    return {"best_gbps": nbytes / min(seconds) / 1e9, "median_gbps": nbytes / statistics.median(seconds) / 1e9,
            "median_s": statistics.median(seconds)}


def _memcpy(nbytes: int, repeats: int) -> dict[str, Any]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pinned.copy_(dev)  # first touch of both host buffers, untimed
    pageable.copy_(dev)
    out = {"pinned": _rate(nbytes, _timed(lambda: pinned.copy_(dev, non_blocking=True), repeats)),
           "pageable": _rate(nbytes, _timed(lambda: pageable.copy_(dev), repeats))}
    del dev, pinned, pageable
    return out


def _state(nbytes: int, piece: int) -> dict[str, torch.Tensor]:
    count = max(1, nbytes // piece)
    return {f"t{i}": torch.randn(piece // 4, device="cuda") for i in range(count)}


def _staging(state: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    from torchaux.checkpoint.engine.pool import HostBufferPool
    from torchaux.checkpoint.engine.staging import stage

    pool = HostBufferPool()
    nbytes = sum(t.nbytes for t in state.values())
    calls: list[float] = []
    totals: list[float] = []
    for _ in range(repeats + 1):  # the first fills the pool (cold)
        _sync()
        start = time.perf_counter()
        snap = stage(state, pool=pool, pickle_module=pickle, pickle_protocol=2)
        called = time.perf_counter()
        snap.finish_staging()
        done = time.perf_counter()
        snap.release(pool)
        calls.append(called - start)
        totals.append(done - start)
    pool.clear()
    out = _rate(nbytes, totals[1:])
    out.update(cold_s=totals[0], call_s=statistics.median(calls[1:]), cold_call_s=calls[0])
    return out


def _save_async(state: dict[str, torch.Tensor], directory: str, repeats: int) -> dict[str, Any]:
    import torchaux
    from torchaux.checkpoint.engine.saver import AsyncSaver

    nbytes = sum(t.nbytes for t in state.values())
    saver = AsyncSaver()
    staged: list[float] = []
    calls: list[float] = []
    try:
        for i in range(repeats + 1):
            saver.wait()  # the previous file is written: only staging is timed
            _sync()
            start = time.perf_counter()
            handle = torchaux.save_async(state, os.path.join(directory, f"s{i % 2}.pt"), saver=saver)
            calls.append(time.perf_counter() - start)
            handle.staged.result()
            staged.append(time.perf_counter() - start)
        saver.wait()
    finally:
        saver.close()
    out = _rate(nbytes, staged[1:])
    out.update(call_s=statistics.median(calls[1:]), cold_staged_s=staged[0])
    return out


def _loads(state: dict[str, torch.Tensor], directory: str, repeats: int) -> dict[str, Any]:
    import torchaux

    path = os.path.join(directory, "load.pt")
    torch.save(state, path)
    nbytes = os.path.getsize(path)
    ways: dict[str, Callable[[], Any]] = {
        "torch.load": lambda: torch.load(path, map_location="cuda", weights_only=True),
        "torchaux.load": lambda: torchaux.load(path, map_location="cuda"),
        "load_checkpoint": lambda: torchaux.load_checkpoint(path, map_location="cuda"),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():  # warm the page cache and each reader's first call
        fn()
    for _ in range(repeats):
        for name, fn in ways.items():
            times[name] += _timed(fn, 1)
    out: dict[str, Any] = {name: _rate(nbytes, t) for name, t in times.items()}
    got = torchaux.load(path, map_location="cuda")
    out["equal"] = all(got[k].device.type == "cuda" and torch.equal(got[k], v) for k, v in state.items())
    os.remove(path)
    return out


def _model_stall(layers: int, directory: str, repeats: int) -> dict[str, Any]:
    import torchaux
    from torchaux.checkpoint.engine.saver import AsyncSaver

    torch.manual_seed(0)
    width = 8192  # 8192^2 fp32 = 256 MiB per layer
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(64, width, device="cuda")

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    saver = AsyncSaver()
    out: dict[str, Any] = {"state_gib": 3 * layers * width * width * 4 / 2**30}
    try:
        for mode in ("none", "eager", "model="):
            calls, steps = [], []
            for i in range(repeats + 1):  # the first warms the pool
                saver.wait()
                _sync()
                start = time.perf_counter()
                if mode != "none":
                    state = {"model": model.state_dict(), "optim": opt.state_dict()}
                    torchaux.save_async(state, os.path.join(directory, f"m{i % 2}.pt"), saver=saver,
                                        model=model if mode == "model=" else None)
                    del state
                called = time.perf_counter()
                step()
                torch.cuda.current_stream().synchronize()
                calls.append(called - start)
                steps.append(time.perf_counter() - called)
            saver.wait()
            out[mode] = {"call_s": statistics.median(calls[1:]), "step_s": statistics.median(steps[1:]),
                         "stall_s": statistics.median([c + s for c, s in zip(calls[1:], steps[1:])])}
    finally:
        saver.close()
    base = out["none"]["stall_s"]
    for mode in ("eager", "model="):
        out[mode]["stall_s"] -= base  # call + its step, minus a step without a save
    return out


def run_cuda(*, size_mib: int = 4096, repeats: int = 5, layers: int = 4, directory: str | None = None,
             log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """All of the module docstring's figures; needs a CUDA device."""
    if not torch.cuda.is_available():
        raise ValueError("torchaux bench --cuda needs a CUDA device; none is visible")
    if size_mib < 64 or repeats < 1 or layers < 1:
        raise ValueError(f"expected size_mib >= 64, repeats >= 1, layers >= 1; found {size_mib}, "
                         f"{repeats}, {layers}")
    nbytes = size_mib * _MIB
    work = tempfile.mkdtemp(prefix="torchaux-bench-cuda-", dir=directory)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "size_mib": size_mib}
    try:
        log("pinned memcpy")
        out["memcpy"] = _memcpy(nbytes, repeats)
        for name, piece in (("one tensor", nbytes), ("64 MiB tensors", 64 * _MIB)):
            log(f"staging: {name}")
            state = _state(nbytes, piece)
            out[f"stage {name}"] = _staging(state, repeats)
            del state
        state = _state(nbytes, 64 * _MIB)
        log("save_async")
        out["save_async"] = _save_async(state, work, repeats)
        log("loads")
        out["load"] = _loads(state, work, repeats)
        del state
        torch.cuda.empty_cache()
        log("model= stall")
        out["model"] = _model_stall(layers, work, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pinned = out["memcpy"]["pinned"]["best_gbps"]
    out["ratios"] = {
        **{f"{k} / pinned memcpy": out[k]["best_gbps"] / pinned
           for k in ("stage one tensor", "stage 64 MiB tensors", "save_async")},
        **{f"{k} / torch.load": out["load"][k]["median_gbps"] / out["load"]["torch.load"]["median_gbps"]
           for k in ("torchaux.load", "load_checkpoint")},
    }
    return out


def format_cuda(r: dict[str, Any]) -> str:
    """A readable report of :func:`run_cuda`'s figures."""
    lines = [f"torchaux bench --cuda: {r['device']}, torch {r['torch']} (CUDA {r['cuda']}), "
             f"{r['size_mib']} MiB"]
    for k in ("pinned", "pageable"):
        m = r["memcpy"][k]
        lines.append(f"  D2H memcpy {k:9} best {m['best_gbps']:6.1f} GB/s  median {m['median_gbps']:6.1f}")
    for k in ("stage one tensor", "stage 64 MiB tensors", "save_async"):
        m = r[k]
        cold = m.get("cold_s", m.get("cold_staged_s"))
        lines.append(f"  {k:22} best {m['best_gbps']:6.1f} GB/s  median {m['median_gbps']:6.1f}  "
                     f"call {m['call_s'] * 1e3:7.2f} ms  cold {cold:.3f} s")
    for k in ("torch.load", "torchaux.load", "load_checkpoint"):
        m = r["load"][k]
        lines.append(f"  load cuda {k:16} {m['median_gbps']:6.2f} GB/s ({m['median_s']:.3f} s)")
    lines.append(f"  loaded equal: {r['load']['equal']}")
    m = r["model"]
    lines.append(f"  model state {m['state_gib']:.1f} GiB: step {m['none']['step_s'] * 1e3:.1f} ms; "
                 f"stall per save eager {m['eager']['stall_s'] * 1e3:.1f} ms (call "
                 f"{m['eager']['call_s'] * 1e3:.1f}), model= {m['model=']['stall_s'] * 1e3:.1f} ms "
                 f"(call {m['model=']['call_s'] * 1e3:.1f})")
    lines += [f"  {k:36} {v:6.3f}x" for k, v in r["ratios"].items()]
    return "\n".join(lines)


def main(args: Any) -> int:
    """``torchaux bench --cuda [--size-mib N] [--json F]``."""
    import sys

    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if args.verbose else (
        lambda _m: None)
    size_mib = args.size_mib or 4096
    r = run_cuda(size_mib=size_mib, layers=max(1, size_mib // 1024),  # state = 3 x params
                 repeats=int(os.environ.get("TORCHAUX_BENCH_REPEATS", "5")), directory=args.dir, log=log)
    print(format_cuda(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
