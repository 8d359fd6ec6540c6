"""``torchaux bench --frameworks``: the framework's own checkpointing against torchaux's drop-ins.

The same small training run per method, in this process, with the same
model, data and checkpoint interval (:mod:`.lightning_run`, :mod:`.hf_run`).
What a user pays is measured in the steady state of a long run; every run
checkpoints at steps ``every, 2*every, ..., m*every`` and keeps a
:class:`~.clock.RunClock` of its steps:

* loop overhead per checkpoint, **paired** (the figure the bars are judged
  on): within each run, ``save + gap - 2 * clean`` windows of ``every // 3``
  steps after each timed checkpoint (:func:`~.clock.paired_overheads`; the
  first, cold, checkpoint is not timed), mean over the run's checkpoints;
* loop overhead per checkpoint **against the no-checkpoint run**: the
  seconds from step ``every`` to step ``m*every - 1`` minus those of the
  baseline run of the same round, over the ``m - 2`` checkpoints in between
  (the issue's definition; two runs drift apart by more than the signal on a
  shared 2-core VM, docs/benchmarks.md section 17);
* stall per checkpoint: the seconds the training thread spends inside the
  checkpoint calls over those steps (``Trainer.save_checkpoint`` for
  Lightning, ``Trainer._save_checkpoint`` or the callback's two halves for
  HF), plus the seconds it spent in torchaux's ``model=`` fences;
* time until durable: loop start until every file is written and, for
  methods that do not fsync, ``os.sync()`` has returned; files complete: how
  many checkpoints hold their step.

Every round runs every method once, in a rotated order; figures are medians
over the rounds (round 0 warms the process up and is not counted).  Training
runs on ``threads`` intra-op threads (default: all cores but one), so one
core is left for checkpoint writers as on an accelerator host, where the
training thread mostly waits for the device; every method gets the same.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchaux.cli.bench.suites.frameworks.clock import RunClock, paired_overheads, timed_saves

__all__ = ["FrameworkResult", "run_frameworks", "format_frameworks"]

#: Defaults: a 128 MiB model (~384 MiB checkpoints with Adam's two moments), a
#: checkpoint every 15 steps (windows of 5), 90 steps (4 paired checkpoints a
#: run), 3 rounds.
DEFAULT_SIZE_MIB, DEFAULT_EVERY, DEFAULT_STEPS_PER_EVERY, DEFAULT_ROUNDS = 128, 15, 6, 3


@dataclass
class FrameworkResult:
    """One method's figures (seconds; medians over the rounds)."""

    framework: str
    method: str
    loop_s: float
    durable_s: float
    saves: int
    complete: int
    overhead_per_save_s: float = 0.0  # against the no-checkpoint run
    #: seconds the training thread spent inside the checkpoint calls, per save
    stall_per_save_s: float = 0.0
    paired_overhead_per_save_s: float = 0.0  # within the run (clock.paired_overheads)
    #: per round: (window seconds, stall seconds per save, durable seconds, complete)
    rounds: list[tuple[float, float, float, int]] = field(default_factory=list)
    #: per round: overhead per save against that round's baseline
    overheads: list[float] = field(default_factory=list)
    #: per round: the mean paired overhead per save of that run
    paired: list[float] = field(default_factory=list)


def _measure(framework: str, methods: dict[str, Any], run: Callable[..., tuple[RunClock, int]],
             *, steps: int, every: int, rounds: int, root: str,
             log: Callable[[str], None]) -> list[FrameworkResult]:
    names = list(methods)
    in_window = steps // every - 2
    base_name = names[0]  # the no-checkpoint run
    results = {n: FrameworkResult(framework, n, 0.0, 0.0, 0 if n == base_name else in_window, 0)
               for n in names}
    for r in range(rounds + 1):  # round 0 warms the process up (imports, allocator, kernels)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            folder = os.path.join(root, framework, f"m{names.index(name)}")
            gc.collect()
            clock, complete = run(methods[name], folder)
            if name != base_name:
                os.sync()  # Lightning's and HF's writers do not fsync; torchaux's did already
            durable = time.perf_counter() - clock.loop_start
            shutil.rmtree(folder, ignore_errors=True)
            os.sync()  # the deletions must not load the next run's disk
            seconds = clock.window()
            paired = paired_overheads(clock.begin, every=every, steps=steps)
            log(f"{framework} round {r} {name}: window {seconds:.2f} s, stall "
                f"{clock.stall:.3f} s, paired {[round(p, 3) for p in paired]}, durable "
                f"{durable:.2f} s, complete {complete}")
            if r:
                res = results[name]
                stall = 0.0 if name == base_name else clock.stall / in_window
                res.rounds.append((seconds, stall, durable, complete))
                res.paired.append(statistics.mean(paired))
    base = results[base_name]
    for res in results.values():
        res.loop_s = statistics.median(x[0] for x in res.rounds)
        res.stall_per_save_s = statistics.median(x[1] for x in res.rounds)
        res.durable_s = statistics.median(x[2] for x in res.rounds)
        res.complete = min(x[3] for x in res.rounds)
        res.paired_overhead_per_save_s = statistics.median(res.paired)
        if res.saves:
            res.overheads = [(x[0] - b[0]) / res.saves for x, b in zip(res.rounds, base.rounds)]
            res.overhead_per_save_s = statistics.median(res.overheads)
            res.saves = steps // every  # files expected (complete counts all of them)
    return list(results.values())


def run_frameworks(
    *, size_mib: int | None = None, steps: int | None = None, every: int | None = None,
    rounds: int = DEFAULT_ROUNDS, batch: int | None = None, threads: int | None = None,
    directory: str | None = None, log: Callable[[str], None] = lambda _m: None,
    frameworks: tuple[str, ...] = ("lightning", "hf"),
) -> list[FrameworkResult]:
    """Run every installed framework's methods; raise ImportError if neither is installed.

    ``None`` takes the module's defaults (``steps``: ``6 * every``); ``every``
    must be at least 3 (three windows) and ``steps`` must allow a timed
    checkpoint (``steps >= 3 * every``: the first warms up, the second is
    timed, the last is outside the window).  ``frameworks`` limits the runs,
    e.g. ``("hf",)``.
    """
    from importlib.util import find_spec

    size_mib = size_mib or DEFAULT_SIZE_MIB
    every = every or DEFAULT_EVERY
    steps = steps or DEFAULT_STEPS_PER_EVERY * every
    if every < 3:
        raise ValueError(f"bench --frameworks needs every >= 3 steps (a save, a gap and a clean "
                         f"window after each checkpoint); got every={every}: raise --every")
    if steps < 3 * every or not timed_saves(every, steps):
        raise ValueError(f"bench --frameworks needs steps >= 3 x every (a warm-up save, a timed "
                         f"one, a last one); got steps={steps}, every={every}: raise --steps")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    unknown = set(frameworks) - {"lightning", "hf"}
    if unknown or not frameworks:
        raise ValueError(f"frameworks must name 'lightning' and/or 'hf', got {frameworks!r}")
    have_pl = "lightning" in frameworks and find_spec("lightning") is not None
    have_hf = "hf" in frameworks and find_spec("transformers") is not None
    if not (have_pl or have_hf):
        raise ImportError("bench --frameworks needs lightning or transformers: "
                          "pip install 'torchaux[lightning,hf]'")
    from torchaux.cli.bench.suites.frameworks.hf_run import hf_methods
    from torchaux.cli.bench.suites.frameworks.lightning_run import lightning_methods

    root = tempfile.mkdtemp(prefix="torchaux-bench-fw-", dir=directory)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        results = []
        common = {"steps": steps, "every": every, "rounds": rounds, "root": root, "log": log}
        if have_pl:
            log("lightning runs")
            results += _measure("lightning", *lightning_methods(size_mib, steps, every, batch or 16),
                                **common)
        if have_hf:
            log("hugging face runs")
            results += _measure("hf", *hf_methods(size_mib, steps, every, batch or 2), **common)
        return results
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(root, ignore_errors=True)


_OURS = (("lightning", "TorchauxCheckpointIO"), ("hf", "AsyncSaveCallback"))


def format_frameworks(results: list[FrameworkResult]) -> str:
    """The table, with torchaux's overheads and stall as ratios of each framework method's.

    >>> r = [FrameworkResult("hf", "x", 1.0, 1.2, 2, 2, 0.25)]
    >>> print(format_frameworks(r).splitlines()[0])
    | framework | method | window s | stall per save s | overhead per save s, paired | overhead per save s, vs no-checkpoint run | durable s | files complete |
    """
    lines = ["| framework | method | window s | stall per save s | overhead per save s, paired "
             "| overhead per save s, vs no-checkpoint run | durable s | files complete |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = ([f"{r.stall_per_save_s:.3f}", f"{r.paired_overhead_per_save_s:.3f}",
                  f"{r.overhead_per_save_s:.3f}", f"{r.complete}/{r.saves}"] if r.saves
                 else ["-", f"{r.paired_overhead_per_save_s:.3f}", "-", "-"])
        lines.append(f"| {r.framework} | {r.method} | {r.loop_s:.2f} | {cells[0]} | {cells[1]} "
                     f"| {cells[2]} | {r.durable_s:.2f} | {cells[3]} |")
    for fw, ours in _OURS:
        mine = next((r for r in results if r.framework == fw and r.method == ours), None)
        if mine is None:
            continue
        for r in results:
            if r.framework != fw or not r.saves or r is mine:
                continue
            for label, value, other, per_mine, per_other in (
                ("loop overhead per save, paired", mine.paired_overhead_per_save_s,
                 r.paired_overhead_per_save_s, mine.paired, r.paired),
                ("loop overhead per save vs the no-checkpoint run", mine.overhead_per_save_s,
                 r.overhead_per_save_s, mine.overheads, r.overheads),
                ("stall per save", mine.stall_per_save_s, r.stall_per_save_s, [], []),
            ):
                if other <= 0:
                    lines.append(f"{fw}: torchaux {label}: {r.method}'s is {other:.3f} s "
                                 "(not above the noise): no ratio")
                    continue
                per_round = [m / o for m, o in zip(per_mine, per_other) if o > 0]
                spread = (f" (rounds: {min(per_round):.3f}..{max(per_round):.3f})"
                          if per_round else "")
                lines.append(f"{fw}: torchaux {label} = {value / other:.3f} x {r.method}{spread}")
    return "\n".join(lines)
