"""The Hugging Face runs of ``torchaux bench --frameworks``: one ``Trainer.train`` per method.

A GPT-2 built from its config (``size_mib`` of fp32 weights, no hub download)
on random tokens, ``save_steps=every``:

* ``save_strategy='no'``: the baseline;
* ``Trainer default save``: the Trainer's own ``_save_checkpoint``;
* ``AsyncSaveCallback``: :class:`torchaux.integrations.hf.AsyncSaveCallback`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from torchaux.cli.bench.suites.frameworks.clock import RunClock

__all__ = ["hf_methods"]


def hf_methods(size_mib: int, steps: int, every: int, batch: int
               ) -> tuple[dict[str, Any], Callable[..., tuple[RunClock, int]]]:
    """``(methods, run)``: ``run(methods[name], folder)`` trains once; returns its clock and files complete."""
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
        def __init__(self, clock: RunClock) -> None:
            self.clock = clock

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.clock.loop_start = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, *a: Any, **k: Any) -> None:
            self.clock.step_begins(state.global_step)

    def run(method: tuple[bool, bool], out: str) -> tuple[RunClock, int]:
        save, ours = method
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=length, n_embd=d,
                                           n_layer=layers, n_head=8))
        args = TrainingArguments(
            out, max_steps=steps, save_steps=every, save_strategy="steps" if save else "no",
            per_device_train_batch_size=batch, report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no",
        )
        clock = RunClock(every, last)
        cb = AsyncSaveCallback() if ours else None
        callbacks = [Marks(clock)] + ([cb] if cb is not None else [])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        if cb is not None:  # both halves of the takeover run on the training thread
            clock.wrap(cb, "_start")
            clock.wrap(cb, "_finish")
        elif save:
            clock.wrap(trainer, "_save_checkpoint")
        trainer.train()  # on_train_end waits for the callback's last save
        complete = sum(
            os.path.isfile(os.path.join(out, f"checkpoint-{s}", "trainer_state.json"))
            for s in range(every, steps + 1, every)
        ) if save else 0
        return clock, complete

    methods: dict[str, Any] = {
        "save_strategy='no'": (False, False),
        "Trainer default save": (True, False),
        "AsyncSaveCallback": (True, True),
    }
    return methods, run
