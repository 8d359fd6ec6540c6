"""Tiny, deterministic training runs for the framework tests (CPU, no downloads).

Imported by name from tests/integrations (pytest puts this folder on sys.path)
and by the child process of the SIGKILL test.
"""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from a test


class TokenData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """64 fixed random token sequences; the labels are the inputs (causal LM)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def hf_trainer(out: str, *, max_steps: int = 6, callbacks: list[Any] | None = None,
               save_steps: int = 2, save_total_limit: int | None = 2) -> Any:
    """A GPT-2 of 2 layers x 32 wide (built from its config) in a Trainer saving every ``save_steps``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        out, max_steps=max_steps, per_device_train_batch_size=4, save_steps=save_steps,
        save_total_limit=save_total_limit, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)


def losses(trainer: Any) -> dict[int, float]:
    """Step -> training loss, from the Trainer's log history."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def stop_at(step: int) -> Any:
    """A callback that ends training after ``step`` (an interruption with the schedule of the full run)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()
