"""``torchaux bench --frameworks``: the framework's own checkpointing against torchaux's drop-ins.

One small training run per method, all in this process, with the same
model, data and checkpoint interval:

* Lightning (``lightning`` installed): no checkpoints (the baseline), the
  default ``TorchCheckpointIO`` (synchronous), Lightning's ``AsyncCheckpointIO``
  and :class:`~torchaux.integrations.lightning.TorchauxCheckpointIO`;
* Hugging Face (``transformers`` installed): ``save_strategy="no"`` (the
  baseline), the Trainer's own save and
  :class:`~torchaux.integrations.hf.AsyncSaveCallback`.

Per method: the stall per checkpoint (seconds the training thread spends
inside the checkpoint calls: ``Trainer.save_checkpoint`` for Lightning,
``Trainer._save_checkpoint`` or the callback's two halves for HF), the
training-loop overhead per checkpoint (loop time minus the warm baseline run,
divided by the number of checkpoints; noisy on a shared machine), time until durable (loop start until every file is written and,
for methods that do not fsync, ``os.sync()`` has returned), and how many
checkpoints are complete and hold their step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FrameworkResult", "run_frameworks", "format_frameworks"]


@dataclass
class FrameworkResult:
    """One method's figures (seconds)."""

    framework: str
    method: str
    loop_s: float
    durable_s: float
    saves: int
    complete: int
    overhead_per_save_s: float = 0.0
    #: seconds the training thread spent inside the checkpoint calls, per save
    stall_per_save_s: float = 0.0


def _lightning_runs(size_mib: int, steps: int, every: int, root: str) -> list[FrameworkResult]:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from torchaux.integrations.lightning import TorchauxCheckpointIO

    width = max(64, int((size_mib * 2**20 / 4 / 4) ** 0.5))  # 4 square layers of fp32

    class Net(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    class LoopTimer(pl.Callback):  # type: ignore[misc,name-defined]
        start = loop = 0.0

        def on_train_start(self, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, *args: Any) -> None:
            self.loop = time.perf_counter() - self.start

    data = torch.utils.data.TensorDataset(torch.randn(16 * steps, width))
    methods: dict[str, Callable[[], list[Any]] | None] = {
        "no checkpoints": None,
        "TorchCheckpointIO (default)": lambda: [],
        "AsyncCheckpointIO": lambda: [AsyncCheckpointIO()],
        "TorchauxCheckpointIO": lambda: [TorchauxCheckpointIO()],
        "no checkpoints (again)": None,
    }
    results = []
    for name, plugins in methods.items():
        folder = os.path.join(root, "lightning", name.split()[0])
        timer = LoopTimer()
        callbacks: list[Any] = [timer]
        if plugins is not None:
            callbacks.append(pl.callbacks.ModelCheckpoint(
                dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
        trainer = pl.Trainer(
            max_steps=steps, plugins=plugins() if plugins else [], callbacks=callbacks,
            enable_checkpointing=plugins is not None, accelerator="cpu", logger=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        stall = _timed(trainer, "save_checkpoint")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        if plugins is not None and "Torchaux" not in name:
            os.sync()  # Lightning's writers do not fsync; torchaux's did already
        durable = time.perf_counter() - timer.start
        saves, complete = _count_lightning(folder, steps, every)
        results.append(FrameworkResult("lightning", name, timer.loop, durable, saves, complete,
                                       stall_per_save_s=stall[0] / saves if saves else 0.0))
        shutil.rmtree(folder, ignore_errors=True)
    return _overheads(results)


def _count_lightning(folder: str, steps: int, every: int) -> tuple[int, int]:
    expected = steps // every
    if not os.path.isdir(folder):
        return 0, 0
    complete = 0
    for step in range(every, steps + 1, every):
        path = os.path.join(folder, f"step={step}.ckpt")
        try:
            ckpt = torch.load(path, weights_only=False, map_location="cpu")
        except (OSError, RuntimeError, EOFError):
            continue
        complete += int(ckpt.get("global_step") == step)
    return expected, complete


def _hf_runs(size_mib: int, steps: int, every: int, root: str) -> list[FrameworkResult]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments)

    from torchaux.integrations.hf import AsyncSaveCallback

    # GPT-2 with n_layer blocks of ~12 * d^2 parameters each (fp32).
    d = 256
    layers = max(1, int(size_mib * 2**20 / 4 / (12 * d * d)))
    tokens = torch.randint(0, 512, (8 * steps, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]

    class Timer(TrainerCallback):  # type: ignore[misc]
        start = loop = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            self.loop = time.perf_counter() - self.start

    results = []
    for name, save, ours in (("save_strategy='no'", False, False), ("Trainer default save", True, False),
                             ("AsyncSaveCallback", True, True),
                             ("save_strategy='no' (again)", False, False)):
        out = os.path.join(root, "hf", name.split()[0].strip("'="))
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=32, n_embd=d, n_layer=layers,
                                           n_head=4))
        args = TrainingArguments(
            out, max_steps=steps, save_steps=every, save_strategy="steps" if save else "no",
            per_device_train_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no",
        )
        timer = Timer()  # first, so it sees the loop end before the callback's final wait
        cb = AsyncSaveCallback() if ours else None
        callbacks = [timer] + ([cb] if cb is not None else [])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        stall = [0.0]
        if cb is not None:  # both halves of the takeover run on the training thread
            stall = _timed(cb, "_start", _timed(cb, "_finish"))
        elif save:
            stall = _timed(trainer, "_save_checkpoint")
        trainer.train()
        if save and not ours:
            os.sync()  # the Trainer does not fsync; torchaux did already
        durable = time.perf_counter() - timer.start
        expected = steps // every if save else 0
        complete = sum(
            os.path.isfile(os.path.join(out, f"checkpoint-{s}", "trainer_state.json"))
            for s in range(every, steps + 1, every)
        ) if save else 0
        results.append(FrameworkResult("hf", name, timer.loop, durable, expected, complete,
                                       stall_per_save_s=stall[0] / expected if expected else 0.0))
        shutil.rmtree(out, ignore_errors=True)
    return _overheads(results)


def _timed(obj: Any, method: str, total: list[float] | None = None) -> list[float]:
    """Wrap ``obj.method`` so that its seconds add up in the returned one-element list."""
    total = total if total is not None else [0.0]
    inner = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    setattr(obj, method, timed)
    return total


def _overheads(results: list[FrameworkResult]) -> list[FrameworkResult]:
    # The first baseline run also warms the process up (imports, allocator,
    # kernels); the bracketing second one is the warm reference.
    base = [r.loop_s for r in results if r.saves == 0]
    baseline = base[-1]
    for r in results:
        if r.saves:
            r.overhead_per_save_s = (r.loop_s - baseline) / r.saves
    return results


def run_frameworks(
    *, size_mib: int = 64, steps: int = 20, every: int = 5, directory: str | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> list[FrameworkResult]:
    """Run every installed framework's methods; raise ImportError if neither is installed."""
    from importlib.util import find_spec

    have_pl, have_hf = find_spec("lightning") is not None, find_spec("transformers") is not None
    if not (have_pl or have_hf):
        raise ImportError("bench --frameworks needs lightning or transformers: "
                          "pip install 'torchaux[lightning,hf]'")
    root = tempfile.mkdtemp(prefix="torchaux-bench-fw-", dir=directory)
    try:
        results = []
        if have_pl:
            log("lightning runs")
            results += _lightning_runs(size_mib, steps, every, root)
        if have_hf:
            log("hugging face runs")
            results += _hf_runs(size_mib, steps, every, root)
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def format_frameworks(results: list[FrameworkResult]) -> str:
    """The table, with torchaux's overhead as a ratio of each framework method's.

    >>> r = [FrameworkResult("hf", "x", 1.0, 1.2, 2, 2, 0.25)]
    >>> print(format_frameworks(r).splitlines()[0])
    | framework | method | loop s | stall per save s | loop overhead per save s | durable s | files complete |
    """
    lines = ["| framework | method | loop s | stall per save s | loop overhead per save s "
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
            if r.framework == fw and r.saves and r is not mine and r.stall_per_save_s > 0:
                lines.append(f"{fw}: torchaux stall per save = "
                             f"{mine.stall_per_save_s / r.stall_per_save_s:.3f} x {r.method}")
    return "\n".join(lines)
