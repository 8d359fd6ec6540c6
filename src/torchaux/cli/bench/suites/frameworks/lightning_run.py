"""The Lightning runs of ``torchaux bench --frameworks``: one ``Trainer.fit`` per method.

An MLP of four square fp32 layers (``size_mib`` of weights) with Adam on
random data; ``ModelCheckpoint(every_n_train_steps=every, save_top_k=-1)``
writes ``step=<N>.ckpt`` through the method's ``CheckpointIO``:

* ``no checkpoints``: the baseline (checkpointing disabled);
* ``TorchCheckpointIO (default)``: Lightning's synchronous ``torch.save``;
* ``AsyncCheckpointIO``: Lightning's thread-pool wrapper around it;
* ``TorchauxCheckpointIO``: :class:`torchaux.integrations.lightning.TorchauxCheckpointIO`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from torchaux.cli.bench.suites.frameworks.clock import RunClock

__all__ = ["lightning_methods"]


def lightning_methods(size_mib: int, steps: int, every: int, batch: int
                      ) -> tuple[dict[str, Any], Callable[..., tuple[RunClock, int]]]:
    """``(methods, run)``: ``run(methods[name], folder)`` trains once; returns its clock and files complete."""
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
        def __init__(self, clock: RunClock) -> None:
            self.clock = clock

        def on_train_start(self, *args: Any) -> None:
            self.clock.loop_start = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            self.clock.step_begins(trainer.global_step)

    def run(plugins: Callable[[], list[Any]] | None, folder: str) -> tuple[RunClock, int]:
        clock = RunClock(every, last)
        callbacks: list[Any] = [Marks(clock)]
        if plugins is not None:
            callbacks.append(pl.callbacks.ModelCheckpoint(
                dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
        trainer = pl.Trainer(
            max_steps=steps, plugins=plugins() if plugins else [], callbacks=callbacks,
            enable_checkpointing=plugins is not None, accelerator="cpu", logger=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        clock.wrap(trainer, "save_checkpoint")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=batch))  # teardown waits
        return clock, _count(folder, steps, every) if plugins is not None else 0

    methods: dict[str, Any] = {
        "no checkpoints": None,
        "TorchCheckpointIO (default)": lambda: [],
        "AsyncCheckpointIO": lambda: [AsyncCheckpointIO()],
        "TorchauxCheckpointIO": lambda: [TorchauxCheckpointIO()],
    }
    return methods, run


def _count(folder: str, steps: int, every: int) -> int:
    complete = 0
    for step in range(every, steps + 1, every):
        try:
            ckpt = torch.load(os.path.join(folder, f"step={step}.ckpt"), weights_only=False,
                              map_location="cpu")
        except (OSError, RuntimeError, EOFError):
            continue
        complete += int(ckpt.get("global_step") == step)
    return complete
