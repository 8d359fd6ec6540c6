"""``torchaux bench --frameworks``: the framework's own checkpointing against torchaux's drop-ins.

The same small training run per method, in this process, with the same
model, data and checkpoint interval:

* Lightning (``lightning`` installed): no checkpoints (the baseline), the
  default ``TorchCheckpointIO`` (synchronous), Lightning's ``AsyncCheckpointIO``
  and :class:`~torchaux.integrations.lightning.TorchauxCheckpointIO`;
* Hugging Face (``transformers`` installed): ``save_strategy="no"`` (the
  baseline), the Trainer's own save and
  :class:`~torchaux.integrations.hf.AsyncSaveCallback`.

What a user pays is measured in the steady state of a long run:

* every run saves at steps ``every, 2*every, ..., m*every`` (``m = steps //
  every``); the timed window runs from the start of step ``every + 1`` (after
  the first save: the cold first fill of a run is paid once, not per save) to
  the end of step ``m*every``, before the last save, so the window holds
  ``m - 2`` save calls, each followed by ``every`` training steps that absorb
  its background write (and the first save's write overlaps the window start);
* the training-loop overhead per checkpoint is (window seconds - the window
  seconds of the no-checkpoint run of the same round) / ``(m - 2)``; every
  round runs every method once, in a rotated order, and the figures are the
  medians over the rounds (a shared machine's load drifts; the per-round ratio
  spread is printed too);
* the stall per checkpoint is the seconds the training thread spends inside
  the checkpoint calls in the window (``Trainer.save_checkpoint`` for
  Lightning, ``Trainer._save_checkpoint`` or the callback's two halves for HF),
  plus the seconds it spent in torchaux's ``model=`` fences (copies the
  writer had not made yet when the next backward or optimizer step came);
* time until durable: loop start until every file is written and, for
  methods that do not fsync, ``os.sync()`` has returned; files complete: how
  many checkpoints hold their step.

Training runs on ``threads`` intra-op threads (default: all cores but one), so
one core is left for checkpoint writers as on an accelerator host, where the
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

__all__ = ["FrameworkResult", "run_frameworks", "format_frameworks"]

#: Defaults: a 128 MiB model (~384 MiB checkpoints with Adam's two moments),
#: a save every 10 steps, 3 saves timed per run, 3 rounds.
DEFAULT_SIZE_MIB, DEFAULT_EVERY, DEFAULT_STEPS, DEFAULT_ROUNDS = 128, 10, 50, 3


@dataclass
class FrameworkResult:
    """One method's figures (seconds; medians over the rounds)."""

    framework: str
    method: str
    loop_s: float
    durable_s: float
    saves: int
    complete: int
    overhead_per_save_s: float = 0.0
    #: seconds the training thread spent inside the checkpoint calls, per save
    stall_per_save_s: float = 0.0
    #: per round: (window seconds, stall seconds per save, durable seconds, complete)
    rounds: list[tuple[float, float, float, int]] = field(default_factory=list)
    #: per round: overhead per save against that round's baseline
    overheads: list[float] = field(default_factory=list)


class _Window:
    """Start/stop marks of the timed window, and checkpoint-call seconds inside it."""

    def __init__(self) -> None:
        self.loop_start = self.start = self.stop = 0.0
        self.running = False
        self.stall = 0.0
        self._fenced = 0.0

    def begin(self) -> None:
        from torchaux.checkpoint.engine.staging import fence_blocked_seconds

        self._fenced = fence_blocked_seconds()
        self.running, self.start = True, time.perf_counter()

    def end(self) -> None:
        from torchaux.checkpoint.engine.staging import fence_blocked_seconds

        if self.running:
            self.running, self.stop = False, time.perf_counter()
            # Copies a training thread made itself in a model= fence are stall too.
            self.stall += fence_blocked_seconds() - self._fenced

    def wrap(self, obj: Any, method: str) -> None:
        """Add the seconds of ``obj.method`` calls made inside the window to ``stall``."""
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            counted, start = self.running, time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if counted:
                    self.stall += time.perf_counter() - start

        setattr(obj, method, timed)


def _lightning_methods(size_mib: int, steps: int, every: int, batch: int
                       ) -> tuple[dict[str, Any], Callable[..., tuple[_Window, int]]]:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from torchaux.integrations.lightning import TorchauxCheckpointIO

    width = max(64, int((size_mib * 2**20 / 4 / 4) ** 0.5))  # 4 square layers of fp32
    data = torch.utils.data.TensorDataset(
        torch.randn(batch * steps, width, generator=torch.Generator().manual_seed(0)))
    last = steps // every * every

    class Net(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    class Marks(pl.Callback):  # type: ignore[misc,name-defined]
        # ModelCheckpoint runs after every other callback (Lightning reorders
        # them), so at a save step this hook runs before the save.
        def __init__(self, window: _Window) -> None:
            self.w = window

        def on_train_start(self, *args: Any) -> None:
            self.w.loop_start = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == every:
                self.w.begin()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == last:
                self.w.end()

    def run(plugins: Callable[[], list[Any]] | None, folder: str) -> tuple[_Window, int]:
        window = _Window()
        callbacks: list[Any] = [Marks(window)]
        if plugins is not None:
            callbacks.append(pl.callbacks.ModelCheckpoint(
                dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
        trainer = pl.Trainer(
            max_steps=steps, plugins=plugins() if plugins else [], callbacks=callbacks,
            enable_checkpointing=plugins is not None, accelerator="cpu", logger=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        window.wrap(trainer, "save_checkpoint")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=batch))  # teardown waits
        return window, _count_lightning(folder, steps, every) if plugins is not None else 0

    methods: dict[str, Any] = {
        "no checkpoints": None,
        "TorchCheckpointIO (default)": lambda: [],
        "AsyncCheckpointIO": lambda: [AsyncCheckpointIO()],
        "TorchauxCheckpointIO": lambda: [TorchauxCheckpointIO()],
    }
    return methods, run


def _count_lightning(folder: str, steps: int, every: int) -> int:
    complete = 0
    for step in range(every, steps + 1, every):
        try:
            ckpt = torch.load(os.path.join(folder, f"step={step}.ckpt"), weights_only=False,
                              map_location="cpu")
        except (OSError, RuntimeError, EOFError):
            continue
        complete += int(ckpt.get("global_step") == step)
    return complete


def _hf_methods(size_mib: int, steps: int, every: int, batch: int
                ) -> tuple[dict[str, Any], Callable[..., tuple[_Window, int]]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from torchaux.integrations.hf import AsyncSaveCallback

    hf_logging.disable_progress_bar()  # "Writing model shards" bars on every save
    # GPT-2 with n_layer blocks of ~12 * d^2 parameters each (fp32).
    d, length = 512, 16
    layers = max(1, round(size_mib * 2**20 / 4 / (12 * d * d)))
    tokens = torch.randint(0, 512, (batch * steps, length),
                           generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    last = steps // every * every

    class Marks(TrainerCallback):  # type: ignore[misc]
        # Placed before AsyncSaveCallback; the Trainer's own save runs after on_step_end.
        def __init__(self, window: _Window) -> None:
            self.w = window

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.w.loop_start = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, *a: Any, **k: Any) -> None:
            if state.global_step == every:
                self.w.begin()

        def on_step_end(self, args: Any, state: Any, *a: Any, **k: Any) -> None:
            if state.global_step == last:
                self.w.end()

    def run(method: tuple[bool, bool], out: str) -> tuple[_Window, int]:
        save, ours = method
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=length, n_embd=d,
                                           n_layer=layers, n_head=8))
        args = TrainingArguments(
            out, max_steps=steps, save_steps=every, save_strategy="steps" if save else "no",
            per_device_train_batch_size=batch, report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no",
        )
        window = _Window()
        cb = AsyncSaveCallback() if ours else None
        callbacks = [Marks(window)] + ([cb] if cb is not None else [])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        if cb is not None:  # both halves of the takeover run on the training thread
            window.wrap(cb, "_start")
            window.wrap(cb, "_finish")
        elif save:
            window.wrap(trainer, "_save_checkpoint")
        trainer.train()  # on_train_end waits for the callback's last save
        complete = sum(
            os.path.isfile(os.path.join(out, f"checkpoint-{s}", "trainer_state.json"))
            for s in range(every, steps + 1, every)
        ) if save else 0
        return window, complete

    methods: dict[str, Any] = {
        "save_strategy='no'": (False, False),
        "Trainer default save": (True, False),
        "AsyncSaveCallback": (True, True),
    }
    return methods, run


def _measure(framework: str, methods: dict[str, Any], run: Callable[..., tuple[_Window, int]],
             *, steps: int, every: int, rounds: int, root: str,
             log: Callable[[str], None]) -> list[FrameworkResult]:
    names = list(methods)
    timed_saves = steps // every - 2
    base_name = names[0]  # the no-checkpoint run
    results = {n: FrameworkResult(framework, n, 0.0, 0.0, 0 if n == base_name else timed_saves, 0)
               for n in names}
    for r in range(rounds + 1):  # round 0 warms the process up (imports, allocator, kernels)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            folder = os.path.join(root, framework, f"m{names.index(name)}")
            gc.collect()
            window, complete = run(methods[name], folder)
            if name != base_name:
                os.sync()  # Lightning's and HF's writers do not fsync; torchaux's did already
            durable = time.perf_counter() - window.loop_start
            shutil.rmtree(folder, ignore_errors=True)
            os.sync()  # the deletions must not load the next run's disk
            seconds = window.stop - window.start
            log(f"{framework} round {r} {name}: window {seconds:.2f} s, stall "
                f"{window.stall:.3f} s, durable {durable:.2f} s, complete {complete}")
            if r:
                stall = 0.0 if name == base_name else window.stall / timed_saves
                results[name].rounds.append((seconds, stall, durable, complete))
    base = results[base_name]
    for res in results.values():
        res.loop_s = statistics.median(x[0] for x in res.rounds)
        res.stall_per_save_s = statistics.median(x[1] for x in res.rounds)
        res.durable_s = statistics.median(x[2] for x in res.rounds)
        res.complete = min(x[3] for x in res.rounds)
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

    ``None`` takes the module's defaults; ``steps`` must allow three saves
    (``steps >= 3 * every``): the first warms up, the last is outside the window.
    ``frameworks`` limits the runs, e.g. ``("hf",)``.
    """
    from importlib.util import find_spec

    size_mib = size_mib or DEFAULT_SIZE_MIB
    every = every or DEFAULT_EVERY
    steps = steps or max(DEFAULT_STEPS, 5 * every)
    if steps < 3 * every:
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
    root = tempfile.mkdtemp(prefix="torchaux-bench-fw-", dir=directory)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        results = []
        common = {"steps": steps, "every": every, "rounds": rounds, "root": root, "log": log}
        if have_pl:
            log("lightning runs")
            results += _measure("lightning", *_lightning_methods(size_mib, steps, every,
                                                                 batch or 16), **common)
        if have_hf:
            log("hugging face runs")
            results += _measure("hf", *_hf_methods(size_mib, steps, every, batch or 2), **common)
        return results
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(root, ignore_errors=True)


def format_frameworks(results: list[FrameworkResult]) -> str:
    """The table, with torchaux's overhead and stall as ratios of each framework method's.

    >>> r = [FrameworkResult("hf", "x", 1.0, 1.2, 2, 2, 0.25)]
    >>> print(format_frameworks(r).splitlines()[0])
    | framework | method | window s | stall per save s | loop overhead per save s | durable s | files complete |
    """
    lines = ["| framework | method | window s | stall per save s | loop overhead per save s "
             "| durable s | files complete |", "|---|---|---|---|---|---|---|"]
    for r in results:
        files = f"{r.complete}/{r.saves}" if r.saves else "-"
        over = f"{r.overhead_per_save_s:.3f}" if r.saves else "-"
        stall = f"{r.stall_per_save_s:.3f}" if r.saves else "-"
        lines.append(f"| {r.framework} | {r.method} | {r.loop_s:.2f} | {stall} | {over} "
                     f"| {r.durable_s:.2f} | {files} |")
    for fw, ours in (("lightning", "TorchauxCheckpointIO"), ("hf", "AsyncSaveCallback")):
        mine = next((r for r in results if r.framework == fw and r.method == ours), None)
        if mine is None:
            continue
        for r in results:
            if r.framework != fw or not r.saves or r is mine:
                continue
            if r.overhead_per_save_s > 0:
                per_round = [m / o for m, o in zip(mine.overheads, r.overheads) if o > 0]
                spread = (f" (rounds: {min(per_round):.3f}..{max(per_round):.3f})"
                          if per_round else "")
                lines.append(f"{fw}: torchaux loop overhead per save = "
                             f"{mine.overhead_per_save_s / r.overhead_per_save_s:.3f} x "
                             f"{r.method}{spread}")
            if r.stall_per_save_s > 0:
                lines.append(f"{fw}: torchaux stall per save = "
                             f"{mine.stall_per_save_s / r.stall_per_save_s:.3f} x {r.method}")
    return "\n".join(lines)
