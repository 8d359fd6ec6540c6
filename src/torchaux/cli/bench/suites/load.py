"""``torchaux bench --load``: load throughput and peak memory of every format torchaux writes.

One state (an MLP's float32 weights and biases, ``--size-mib``, default 256)
is written as a torch.save file, a safetensors file and ``save_checkpoint``
files (plain, CRC, AES-GCM + CRC, AES-CBC).  Each method then loads its file
in a fresh child process (so no method inherits another's warm allocator or
page tables) and reads one byte of every 4 KiB page of every tensor (so the
memory-mapped methods really read the data).  Before the timed load, the
child loads a 1 MiB file of the same format the same way, so no method's
timing includes its imports and first-call set-up (a process that resumes
pays those once, not per checkpoint); the page-cache state of the measured
file is untouched by it:

* ``torch.load``, ``torch.load mmap``, ``safetensors.load_file``: the baselines;
* ``load_checkpoint`` plain / CRC / AES-GCM+CRC / AES-CBC;
* ``torchaux.load`` of the torch.save file, with and without ``mmap``, and of
  the safetensors file with ``mmap``.

Page cache cold (the file ``fsync``-ed, then ``posix_fadvise(DONTNEED)``) and
warm (dropped the same way, then read once sequentially with 8 MiB ``read`` calls
before the load).  Warm starts from a drop because the page cache's folio sizes
depend on who read the file in first, and a memory-mapped load pays for them:
on this VM (Linux 6.18, ext4, THP ``madvise``), a 256 MiB file paged in by
sequential ``read`` calls sits in 2 MiB folios that a mapping takes in ~780
faults (5.5 ms), while the same file paged in by a mapping that first touched
one page per zip member sits in 4 KiB folios, ~4300 faults (20 ms).  Without
the drop, each file's warm state was whatever the previous method left.
Rounds interleave the methods, so machine noise hits all of them alike; the
table shows medians and ratios against
``torch.load`` of the same run, and the peak resident memory a load added
(sampled every 2 ms, :class:`~torchaux.cli.bench.measure.RssSampler`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

__all__ = ["main", "METHODS", "run_load_bench", "format_load_report"]

_MIB = 1 << 20
_KEY = bytes(range(32))
# method -> (file, how it is loaded); files are named in _write_files.
METHODS: dict[str, tuple[str, str]] = {
    "torch.load": ("state.pt", "torch"),
    "torch.load mmap": ("state.pt", "torch-mmap"),
    "safetensors.load_file": ("state.safetensors", "safetensors"),
    "load_checkpoint plain": ("plain.ckpt", "ckpt"),
    "load_checkpoint CRC": ("crc.ckpt", "ckpt-crc"),
    "load_checkpoint AES-GCM+CRC": ("gcm.ckpt", "ckpt-crc-key"),
    "load_checkpoint AES-CBC": ("cbc.ckpt", "ckpt-key"),
    "torchaux.load": ("state.pt", "aux"),
    "torchaux.load mmap": ("state.pt", "aux-mmap"),
    "torchaux.load safetensors mmap": ("state.safetensors", "aux-mmap"),
}
_CHILD = "from torchaux.cli.bench.suites.load import _child; _child()"


def make_state(size_mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An MLP's weights and biases of about ``size_mib`` MiB (float32).

    >>> sum(t.numel() * 4 for t in make_state(1).values()) >= 1 << 20
    True
    """
    gen = torch.Generator().manual_seed(seed)
    width = 1024 if size_mib >= 64 else 256  # 4 MiB or 256 KiB per weight matrix
    layers = max(1, -(-(size_mib * _MIB) // (4 * width * width)))
    state = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.randn(width, width, generator=gen)
        state[f"layers.{i}.bias"] = torch.randn(width, generator=gen)
    return state


def _write_files(state: dict[str, torch.Tensor], directory: str) -> None:
    from safetensors.torch import save_file

    from torchaux.checkpoint.save import save_checkpoint

    torch.save(state, os.path.join(directory, "state.pt"))
    save_file(state, os.path.join(directory, "state.safetensors"))
    save_checkpoint(state, os.path.join(directory, "plain.ckpt"))
    save_checkpoint(state, os.path.join(directory, "crc.ckpt"), crc_check=True)
    save_checkpoint(state, os.path.join(directory, "gcm.ckpt"), crc_check=True,
                    enc_key=_KEY, enc_mode="AES-GCM")
    save_checkpoint(state, os.path.join(directory, "cbc.ckpt"), enc_key=_KEY, enc_mode="AES-CBC")


_WARMUP = "warmup"  # subfolder with a 1 MiB copy of every file, same names


def _load(how: str, path: str) -> Any:
    import torchaux

    if how == "torch":
        return torch.load(path, weights_only=True)
    if how == "torch-mmap":
        return torch.load(path, weights_only=True, mmap=True)
    if how == "safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if how.startswith("ckpt"):
        key = {"dec_key": _KEY, "dec_mode": None} if how.endswith("key") else {}
        return torchaux.load_checkpoint(path, crc_check="crc" in how, **key)
    return torchaux.load(path, mmap=how == "aux-mmap")


def _touch(obj: dict[str, torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every tensor (faults a mapping in)."""
    total = 0
    for t in obj.values():
        if isinstance(t, torch.Tensor) and t.numel():
            total += int(t.reshape(-1).view(torch.uint8)[::4096].sum())
    return total


def _preimport() -> None:
    """Import what every method uses lazily, so no timing includes an import."""
    import pickle  # noqa: F401

    import safetensors.torch  # noqa: F401
    import torch._weights_only_unpickler  # noqa: F401
    from cryptography.hazmat.primitives.ciphers import Cipher  # noqa: F401

    import torchaux.checkpoint.crypto.seekable  # noqa: F401
    import torchaux.checkpoint.formats.safetensors.metadata  # noqa: F401
    import torchaux.checkpoint.formats.torch_save.reader  # noqa: F401
    import torchaux.checkpoint.load  # noqa: F401


def _child() -> None:
    """One measured load, in this process: argv[1] is ``{"how", "path"}``; prints JSON."""
    from torchaux.cli.bench.measure import RssSampler, fingerprint

    request = json.loads(sys.argv[1])
    _preimport()
    _touch(_load(request["how"], request["warmup"]))  # imports and first-call set-up, untimed
    with RssSampler() as rss:
        start = time.perf_counter()
        obj = _load(request["how"], request["path"])
        _touch(obj)
        seconds = time.perf_counter() - start
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    print(json.dumps({
        "seconds": seconds, "peak_rss": rss.peak - rss.base,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "fingerprint": fingerprint(tensors),
    }))


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: str) -> None:
    _drop_cache(path)  # the same page-cache state for every method (module docstring)
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * _MIB):
            pass


def _measure(how: str, path: str) -> dict[str, Any]:
    warmup = os.path.join(os.path.dirname(path), _WARMUP, os.path.basename(path))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps({"how": how, "path": path, "warmup": warmup})],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench child for {how} {path} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_load_bench(
    size_mib: int = 256, directory: str | None = None, *, seed: int = 0, rounds: int = 3,
    methods: tuple[str, ...] | None = None, log: Any = None,
) -> dict[str, Any]:
    """Measure every method; returns the JSON-able results (see the module docstring)."""
    names = list(methods or METHODS)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown load bench methods {unknown}; choose from {sorted(METHODS)}")
    if "torch.load" not in names:
        names.insert(0, "torch.load")  # every ratio is against it
    with tempfile.TemporaryDirectory(dir=directory, prefix="torchaux-load-bench-") as root:
        _write_files(make_state(size_mib, seed), root)
        os.mkdir(os.path.join(root, _WARMUP))
        _write_files(make_state(1, seed + 1), os.path.join(root, _WARMUP))
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(rounds):
            for cache in ("cold", "warm"):
                for name in names:
                    path = os.path.join(root, METHODS[name][0])
                    (_drop_cache if cache == "cold" else _warm)(path)
                    if log:
                        log(f"round {r + 1}/{rounds} {cache} {name}")
                    samples.setdefault((name, cache), []).append(_measure(METHODS[name][1], path))
    reference = samples[("torch.load", "warm")][0]
    out: dict[str, Any] = {
        "size_mib": size_mib, "rounds": rounds, "loaded_bytes": reference["bytes"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "methods": {},
    }
    for name in names:
        row: dict[str, Any] = {}
        for cache in ("cold", "warm"):
            runs = samples[(name, cache)]
            seconds = statistics.median(s["seconds"] for s in runs)
            base = statistics.median(s["seconds"] for s in samples[("torch.load", cache)])
            row[f"{cache}_gbps"] = reference["bytes"] / seconds / 1e9
            row[f"{cache}_ratio"] = base / seconds
            row[f"{cache}_spread"] = [reference["bytes"] / s["seconds"] / 1e9 for s in runs]
        every = samples[(name, "cold")] + samples[(name, "warm")]
        row["peak_rss_mib"] = max(s["peak_rss"] for s in every) / _MIB
        row["consistent"] = all(s["fingerprint"] == reference["fingerprint"] for s in every)
        out["methods"][name] = row
    return out


def format_load_report(results: dict[str, Any]) -> str:
    """The results as a table (ratios against torch.load in the same run)."""
    loaded = results["loaded_bytes"] / _MIB
    lines = [
        f"load: {loaded:.0f} MiB state, {results['rounds']} rounds (medians), {results['machine']}",
        f"{'method':32s} {'cold GB/s':>9s} {'x torch':>7s} {'warm GB/s':>9s} {'x torch':>7s} "
        f"{'peak RSS MiB':>12s} {'/ loaded':>8s}  ok",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"{name:32s} {r['cold_gbps']:9.2f} {r['cold_ratio']:7.2f} {r['warm_gbps']:9.2f} "
            f"{r['warm_ratio']:7.2f} {r['peak_rss_mib']:12.0f} {r['peak_rss_mib'] / loaded:8.2f}  "
            + ("yes" if r["consistent"] else "NO: tensors differ")
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the suite from ``torchaux bench`` arguments; 1 if any method loaded other tensors."""
    size = args.size_mib or 256
    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if args.verbose else None
    results = run_load_bench(
        size, args.dir, seed=args.seed, rounds=getattr(args, "rounds", None) or 3,
        methods=getattr(args, "methods", None), log=log,
    )
    print(format_load_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["consistent"] for r in results["methods"].values()) else 1
