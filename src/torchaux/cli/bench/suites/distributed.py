"""``torchaux bench --distributed``: sharded saves on real gloo ranks, torchaux against DCP.

Each save method runs in a fresh group of ``nproc`` spawned ranks (CPU,
gloo on 127.0.0.1 free ports; :mod:`.ranks` is what a rank runs): an FSDP2
``fully_shard`` MLP of four square layers with Adam, ``--size-mib`` of
state in total (weights and both Adam moments), the state taken with
``torch.distributed.checkpoint.state_dict.get_state_dict`` at every save.
The methods (:data:`.ranks.METHODS`): ``dcp.save``; ``dcp.async_save`` on a
thread (DCP's default blocking stager); ``dcp.async_save`` in DCP's
checkpoint process (``AsyncCheckpointerType.PROCESS``) with its
``DefaultStager`` (pinned memory where CUDA exists, shared memory, staging on
a thread; the loop waits for ``staging_completion`` before the optimizer
step, as DCP asks); ``torchaux.distributed.save_async``; and
``dcp.async_save`` with torchaux's ``StorageWriter`` and ``Stager``.

By default 48 steps with a save every 3, so 8 timed saves per method: with
4 (24 steps) the stall ratio of two runs of the same code swung between
0.26 and 0.60 with the DCP side's single slow saves; with 8 it was 0.185-0.208
(docs/benchmarks.md section 18).

Per method, the largest value over the ranks of:

* stall per save: seconds the training thread spends in the save call, plus
  any wait for staging before the next optimizer step (DCP's async staging:
  ``staging_completion``; torchaux's ``model=`` fence: the copies the
  optimizer step makes itself); waiting for the previous save counts too;
* loop overhead per save: the loop alternates windows of ``every`` steps
  that start with a save and windows without one (same steps and data as
  a run without saves); the mean save window minus the mean no-save window
  (a save's background work must end within its window to be counted all);
* time until durable: from the call until the save is committed (median);
* peak RSS added: peak resident memory during the warm-up save and the
  timed loop, above the peak of a no-save loop, and as a multiple of the
  rank's shard;
* complete: checkpoints that load back equal to their step's state.

Peak RSS and glibc: under glibc's default *dynamic* mmap threshold (mallopt(3),
``M_MMAP_THRESHOLD``: after a large mmapped block is freed, blocks up to its
size come from the heap), the training step's own temporaries (gradients,
Adam's intermediates, FSDP2's all-gathered parameters) stay in a fragmented
heap, and a rank's peak swings by ~100-400 MiB between loops of the same
training, for every method alike.  ``--malloc-mmap-threshold BYTES`` starts
the ranks with ``MALLOC_MMAP_THRESHOLD_`` (glibc's tunable; a fixed threshold
turns the dynamic one off), so "RSS added" shows what the checkpointer itself
holds.

Then load time, checkpoints of ``dcp.save`` (stock reader) and
``torchaux save_async`` (verified checksums): ``dcp.load`` against
``torchaux.distributed.load`` at the same world size and resharded onto one
rank, page cache warm, alternating, medians.  Ratios are torchaux's figure
over the best DCP async mode's (lowest), from the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from typing import Any

from torchaux.cli.bench.suites.ranks import METHODS, width_for

__all__ = ["main", "run_distributed", "format_distributed"]

_MIB = 1 << 20
_ASYNC = [m for m in METHODS if "async" in m and "torchaux" not in m]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(world: int, job: dict[str, Any], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``job`` on ``world`` spawned ranks (with ``env`` added to theirs); their results, by rank."""
    import torch.multiprocessing as mp

    from torchaux.cli.bench.suites.ranks import rank_main

    os.makedirs(job["out"], exist_ok=True)
    before = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # spawned ranks inherit the environment at exec
    try:
        mp.start_processes(rank_main, args=(world, _free_port(), job), nprocs=world,
                           start_method="spawn")
    except Exception as exc:  # a rank died: what it printed goes with the error
        raise RuntimeError(f"bench --distributed: a {job['kind']} job on {world} rank(s) failed "
                           f"({exc}); the ranks' stderr:\n{_log_tails(job['out'], world)}") from exc
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results = []
    for rank in range(world):
        with open(os.path.join(job["out"], f"{rank}.json")) as f:
            results.append(json.load(f))
    return results


def _log_tails(out: str, world: int, chars: int = 3000) -> str:
    """The end of each rank's stderr log (:func:`.ranks.rank_main` writes ``<out>/<rank>.log``)."""
    parts = []
    for rank in range(world):
        try:
            with open(os.path.join(out, f"{rank}.log"), errors="replace") as f:
                text = f.read()[-chars:]
        except OSError as exc:
            text = f"(no log: {exc})"
        parts.append(f"--- rank {rank} ---\n{text}")
    return "\n".join(parts)


def _summarise(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    saves = ranks[0]["saves"]
    per_rank = []
    for r in ranks:
        per_rank.append({
            "stall_s": statistics.mean(r["stalls"]),
            "call_s": statistics.mean(r.get("calls") or r["stalls"]),  # the call alone
            "overhead_s": statistics.mean(r["save_windows"]) - statistics.mean(r["plain_windows"]),
            "durable_s": statistics.median(r["durable"]),
            "rss_added_mib": (r["rss_peak"] - r["rss_base"]) / _MIB,
            "rss_added_x_shard": (r["rss_peak"] - r["rss_base"]) / r["shard_bytes"],
            "rss_peak_mib": r["rss_peak"] / _MIB,
        })
    out = {k: max(p[k] for p in per_rank) for k in per_rank[0]}
    out.update(method=ranks[0]["method"], saves=saves, malloc_env=ranks[0].get("malloc_env"), complete=min(r["complete"] for r in ranks),
               shard_mib=max(r["shard_bytes"] for r in ranks) / _MIB,
               save_windows=ranks[0]["save_windows"], plain_windows=ranks[0]["plain_windows"],
               stalls_per_rank=[r["stalls"] for r in ranks], calls_per_rank=[r.get("calls") for r in ranks])
    return out


def run_distributed(*, nproc: int = 2, size_mib: int = 256, steps: int = 48, every: int = 3,
                    root: str | None = None, repeats: int = 3,
                    malloc_mmap_threshold: int | None = None, device: str = "cpu",
                    log: Any = lambda _m: None) -> dict[str, Any]:
    """Run every method and the load comparison; return the figures (module docstring).

    ``device="cuda"``: one GPU per rank (NCCL cannot put two ranks on one
    GPU), so ``nproc`` may be 1 on a one-GPU machine; the load then runs at
    that world size only.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' for --distributed; found {device!r}")
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError("--distributed --device cuda needs a CUDA device; none is visible "
                             "(run without --device, or with --device cpu, for gloo on CPU)")
        if not 1 <= nproc <= gpus:
            raise ValueError(f"--distributed --device cuda runs one rank per GPU (NCCL); found "
                             f"nproc={nproc} with {gpus} GPU(s): pass --nproc 1..{gpus}")
    if malloc_mmap_threshold is not None and (
        isinstance(malloc_mmap_threshold, bool) or not isinstance(malloc_mmap_threshold, int)
        or malloc_mmap_threshold <= 0
    ):
        raise ValueError(f"malloc_mmap_threshold must be a positive number of bytes or None; "
                         f"found {malloc_mmap_threshold!r}")
    env = None if malloc_mmap_threshold is None else {
        "MALLOC_MMAP_THRESHOLD_": str(malloc_mmap_threshold)}
    if device == "cpu" and nproc < 2:
        raise ValueError(f"--distributed needs nproc >= 2 ranks (saving and resharding); found {nproc}")
    if steps < 2 * every:
        raise ValueError(f"steps ({steps}) must be at least 2 x every ({every}): each save "
                         "window needs a no-save window of `every` steps beside it")
    width = width_for(size_mib, nproc)
    work = tempfile.mkdtemp(prefix="torchaux-bench-dist-", dir=root)
    methods: dict[str, Any] = {}
    try:
        for i, method in enumerate(METHODS):
            log(f"{method}: {nproc} ranks, width {width}")
            job = {"kind": "save", "method": method, "width": width, "steps": steps, "device": device,
                   "every": every, "dir": os.path.join(work, f"m{i}"),
                   "out": os.path.join(work, f"r{i}")}
            os.makedirs(job["dir"])
            try:
                methods[method] = _summarise(_run_ranks(nproc, job, env))
            except Exception as exc:  # a method that fails here is a row of the table, not the end
                if "torchaux" in method:
                    raise
                cause = exc.__cause__ or exc  # the rank's own error, not the log tails
                reason = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
                log(f"{method} failed: {reason}")
                methods[method] = {"method": method, "error": reason}
        last = f"step_{(steps // every - 1) // 2 * 2 * every + 1}"  # the last save window's first step
        loads = {}
        for world in sorted({nproc, 1}, reverse=True):
            log(f"load on {world} rank(s)")
            job = {"kind": "load", "width": width, "repeats": repeats, "device": device,
                   "dcp_dir": os.path.join(work, f"m{METHODS.index('dcp.save')}", last),
                   "torchaux_dir": os.path.join(work, f"m{METHODS.index('torchaux save_async')}", last),
                   "out": os.path.join(work, f"load{world}")}
            got = _run_ranks(world, job, env)
            loads[f"{nproc}->{world}"] = {k: max(r["load_s"][k] for r in got)
                                          for k in got[0]["load_s"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"nproc": nproc, "device": device, "size_mib": size_mib, "width": width, "steps": steps, "every": every,
            "malloc_mmap_threshold": malloc_mmap_threshold, "methods": methods, "load": loads, "ratios": _ratios(methods, loads)}


def _ratios(methods: dict[str, Any], loads: dict[str, Any]) -> dict[str, float]:
    ours = methods["torchaux save_async"]
    out: dict[str, float] = {}
    ran = [m for m in _ASYNC if "error" not in methods[m]]
    for key in ("stall_s", "overhead_s", "durable_s"):
        best = min((methods[m][key] for m in ran), default=0.0)
        out[key] = ours[key] / best if best > 0 else float("inf")
    for name, load in loads.items():
        out[f"load {name}"] = load["torchaux load"] / load["dcp.load"]
    return out


def format_distributed(r: dict[str, Any]) -> str:
    """The table of :func:`run_distributed`'s figures, with the ratios under it."""
    head = (f"{'method':42} {'stall/save':>10} {'overhead/save':>13} {'durable':>8} "
            f"{'RSS added':>14} {'complete':>8}")
    ranks = ("NCCL ranks on CUDA" if r.get("device") == "cuda" else "gloo ranks")
    lines = [f"torchaux bench --distributed: {r['nproc']} {ranks}, {r['size_mib']} MiB of "
             f"state (4 x {r['width']}^2 MLP + Adam), {r['steps']} steps, a save every "
             f"{r['every']}", head, "-" * len(head)]
    for name, m in r["methods"].items():
        if "error" in m:
            lines.append(f"{name:42} failed: {m['error'][:120]}")
            continue
        lines.append(
            f"{name:42} {m['stall_s'] * 1e3:8.1f}ms {m['overhead_s'] * 1e3:11.1f}ms "
            f"{m['durable_s']:7.2f}s {m['rss_added_mib']:6.0f}MiB {m['rss_added_x_shard']:4.2f}x "
            f"{m['complete']:>4}/{m['saves']}")
    shard = next(m for m in r["methods"].values() if "error" not in m)["shard_mib"]
    threshold = r.get("malloc_mmap_threshold")
    malloc = (f"MALLOC_MMAP_THRESHOLD_={threshold}" if threshold
              else "glibc's dynamic mmap threshold")
    lines.append(f"(shard per rank {shard:.0f} MiB; RSS added = peak above a no-save loop's peak; "
                 f"{malloc})")
    for name, load in r["load"].items():
        lines.append(f"load {name}: dcp.load {load['dcp.load']:.3f}s, torchaux load "
                     f"{load['torchaux load']:.3f}s")
    lines.append("ratios (torchaux / best DCP async mode; load: torchaux / dcp.load):")
    lines += [f"  {k:14} {v:6.3f}x" for k, v in r["ratios"].items()]
    return "\n".join(lines)


def main(args: Any) -> int:
    """``torchaux bench --distributed [--nproc N]`` (default 2; ``TORCHAUX_BENCH_NPROC`` too)."""
    import sys

    device = getattr(args, "device", "auto")
    device = "cpu" if device == "auto" else device  # the figures are gloo on CPU
    default = "2"
    if device == "cuda":  # one rank per GPU, at most 2
        import torch

        default = str(max(1, min(2, torch.cuda.device_count())))
    nproc = getattr(args, "nproc", None) or int(os.environ.get("TORCHAUX_BENCH_NPROC", default))
    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if args.verbose else (
        lambda _m: None)
    r = run_distributed(nproc=nproc, size_mib=args.size_mib or 256, steps=args.steps or 48,
                        every=args.every or 3, root=args.dir,
                        malloc_mmap_threshold=getattr(args, "malloc_mmap_threshold", None),
                        device=device, log=log)
    print(format_distributed(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
