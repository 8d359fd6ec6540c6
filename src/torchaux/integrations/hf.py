"""Non-blocking checkpoints for ``transformers.Trainer``: ``Trainer(..., callbacks=[AsyncSaveCallback()])``.

The Trainer has no asynchronous save (transformers #23419) and may resume from
a half-written checkpoint (#35782).  ``on_step_end`` (and ``on_epoch_end``) is
the public route to take the save over (ecosystem-anchors.md §2): the
callback clears ``control.should_save`` and writes the same checkpoint itself:

1. on the training thread, at the step the Trainer would save: the model
   weights (safetensors, sharded with ``model.safetensors.index.json`` above
   ``max_shard_size``, ``{"format": "pt"}`` metadata), ``optimizer.pt``,
   ``scheduler.pt``, ``scaler.pt`` and ``rng_state.pth`` are pickled and given
   warm host buffers as one save (:mod:`torchaux.integrations.staged_files`);
   the bytes of the weights and of the optimizer state are copied by the
   writer thread while the next forward runs, under the engine's ``model=``
   fences (the next backward's gradient accumulation and optimizer step wait
   for, or do, what is left); the small JSON files (config, tokenizer,
   ``training_args.bin``) are written directly, into ``tmp-checkpoint-<N>`` (a
   name HF's rotation glob ``checkpoint-*`` and ``get_last_checkpoint``'s
   ``^checkpoint-(\\d+)$`` never match);
2. at the next Trainer event (after this step's logging and evaluation, as HF
   orders them) ``trainer_state.json`` is added and the folder is queued for
   publication;
3. the writer thread writes every file, fsyncs, renames the folder to
   ``checkpoint-<N>`` in one step (:mod:`torchaux.checkpoint.storage.directory`)
   and only then applies ``save_total_limit`` over published checkpoints.

``trainer.train(resume_from_checkpoint=True)`` therefore only ever sees
complete checkpoints.  The last one is published before the Trainer's final
metrics are logged, so ``load_best_model_at_end`` and ``save_total_limit=1``'s
pruning see it; a failed save is raised at the next save or at the end of
training.  Other callbacks' ``on_save`` run once their checkpoint is published
(:meth:`AsyncSaveCallback._announce_saves`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from torchaux.checkpoint.engine import staging
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.checkpoint.storage.directory import publish_directory, remove_stale, remove_tree
from torchaux.integrations.rotation import PUBLISHED, rotate_published
from torchaux.integrations.staged_files import StagedFile, save_files

try:
    from transformers import Trainer, TrainerCallback
except ImportError:
    raise ImportError(
        "torchaux.integrations.hf needs transformers: pip install 'torchaux[hf]'"
    ) from None

__all__ = ["AsyncSaveCallback", "STAGING_PREFIX"]

#: Staging folders are ``tmp-checkpoint-<N>``: HF globs ``checkpoint-*`` (anchored
#: at the start of the name), so ``checkpoint-N.tmp`` would be rotated, this is not.
STAGING_PREFIX = "tmp-"
# transformers 5.x PreTrainedModel.save_pretrained default (modeling_utils.py).
_HF_MAX_SHARD_SIZE = "50GB"


@dataclass
class _Pending:
    step: int
    staging: str
    final: str
    control_state: dict[str, Any] = field(default_factory=dict)
    files: list[SaveHandle] = field(default_factory=list)


class AsyncSaveCallback(TrainerCallback):  # type: ignore[misc]
    """Take over the Trainer's checkpoints: staged on the caller, written and published in the background.

    Args:
        max_shard_size: model shards above this size (HF's notation, ``"5GB"``,
            or bytes) are split with an index, as ``save_pretrained`` does.
        on_committed: called as ``on_committed(path)`` on the writer thread
            once ``checkpoint-<N>`` is published and durable.
        saver: the :class:`torchaux.AsyncSaver` to write with (default: its own).
        trainer: the Trainer; found automatically when the callback is passed
            to ``Trainer(callbacks=[...])``.

    Example (the full run is in the README and tests/integrations/test_hf.py):
        >>> cb = AsyncSaveCallback(max_shard_size="2GB")
        >>> cb.max_shard_size
        '2GB'
    """

    def __init__(
        self,
        *,
        max_shard_size: int | str = _HF_MAX_SHARD_SIZE,
        on_committed: Callable[[str], object] | None = None,
        saver: AsyncSaver | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        if not isinstance(max_shard_size, (int, str)) or isinstance(max_shard_size, bool):
            raise TypeError(f"max_shard_size must be an int or a str like '5GB', got {max_shard_size!r}")
        if on_committed is not None and not callable(on_committed):
            raise TypeError(f"on_committed must be callable, got {type(on_committed).__name__}")
        if saver is not None and not isinstance(saver, AsyncSaver):
            raise TypeError(f"saver must be a torchaux.AsyncSaver or None, got {type(saver).__name__}")
        if trainer is not None and not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.max_shard_size = max_shard_size
        self.on_committed = on_committed
        # Saves of one run: shards, optimizer, ... then the publish job, in order on one thread.
        self._saver = saver or AsyncSaver(max_pending=64, name="torchaux-hf-writer")
        self._trainer = trainer
        self._pending: _Pending | None = None
        self._publish: SaveHandle | None = None
        self._lock = threading.Lock()
        self._published: list[int] = []  # steps published, their on_save not yet run

    # -- Trainer events ------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._find_trainer()
        if args.world_size > 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "AsyncSaveCallback supports single-process training; found world_size="
                f"{args.world_size} (DeepSpeed: {trainer.is_deepspeed_enabled}, FSDP: "
                f"{trainer.is_fsdp_enabled}); remove the callback for distributed runs"
            )
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy == "best":
            raise ValueError(
                "AsyncSaveCallback does not support save_strategy='best' (the decision comes "
                "after evaluation); use save_strategy='steps' or 'epoch'"
            )
        if args.should_save and os.path.isdir(args.output_dir):
            stale = [n for n in os.listdir(args.output_dir)
                     if n.startswith(STAGING_PREFIX) and PUBLISHED.match(n[len(STAGING_PREFIX):])]
            remove_stale(args.output_dir, stale)  # left by a killed run
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        if args.should_save and strategy != "no" and _is_pretrained(model):
            # transformers builds its weight-conversion table on first use (0.3 s,
            # cached process-wide): here, not in the first save's stall.
            _hf_weights(model, model.state_dict())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(args, state)
        self._announce_saves(args, state, control)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(args, state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self._start(args, state, control)
        self._announce_saves(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(args, state)
        if control.should_save:
            self._start(args, state, control)
        self._announce_saves(args, state, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        # The Trainer logs its final metrics ("train_runtime", ...) just before
        # load_best_model_at_end loads the best checkpoint and save_total_limit=1
        # prunes the others: the last checkpoint must be published by then.
        if isinstance(logs, dict) and "train_runtime" in logs:
            self._finish(args, state)
            self.wait()
            self._announce_saves(args, state, control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(args, state)
        self.wait()
        self._announce_saves(args, state, control)

    def wait(self) -> None:
        """Block until the last checkpoint is published; raise a failure nobody has seen."""
        publish, self._publish = self._publish, None
        if publish is not None:
            publish.wait()
        self._saver.wait()

    def _announce_saves(self, args: Any, state: Any, control: Any) -> None:
        """The other callbacks' ``on_save`` for each checkpoint published since the last event.

        HF calls ``on_save`` right after its synchronous save; here it runs on
        the training thread at the first event after ``checkpoint-<N>`` is
        published, with ``state.global_step`` = N during the call (callbacks
        find the checkpoint as ``checkpoint-{state.global_step}``).
        """
        with self._lock:
            ready, self._published = self._published, []
        if not ready:
            return
        handler = self._find_trainer().callback_handler
        # CallbackHandler.on_save clears should_save: a save the Trainer asks for
        # at this event must still happen.
        current, should_save = state.global_step, control.should_save
        try:
            for step in ready:
                state.global_step = step
                handler.on_save(args, state, control)
        finally:
            state.global_step, control.should_save = current, should_save

    # -- the save ------------------------------------------------------------------

    def _start(self, args: Any, state: Any, control: Any) -> None:
        control_state = control.state()  # as HF records it: should_save still set
        control.should_save = False  # the Trainer must not write it synchronously as well
        if not args.should_save:
            return
        trainer = self._find_trainer()
        self.wait()  # one checkpoint in flight: bounds host memory to one copy
        step = state.global_step
        final = os.path.join(args.output_dir, f"checkpoint-{step}")
        staging_dir = os.path.join(args.output_dir, f"{STAGING_PREFIX}checkpoint-{step}")
        if os.path.lexists(staging_dir):  # a save of this step that never published
            remove_tree(staging_dir)  # (it fsyncs the parent: only when there is something to remove)
        os.makedirs(staging_dir)
        trainer.store_flos()
        # HF records the control flags of the save step itself in trainer_state.json.
        pending = _Pending(step, staging_dir, final, control_state=control_state)
        self._pending = pending
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        files = self._model_files(trainer, model, pending)
        if not args.save_only_model:
            files += self._training_state_files(trainer, pending)
        # One job: the weights' and optimizer's bytes are copied by the writer while
        # the next forward runs (fenced on the trained module); publish_directory
        # fsyncs every file before the rename, so the files skip their own fsyncs.
        pending.files.append(save_files(files, saver=self._saver, model=trainer.model, durable=False))

    def _model_files(self, trainer: Trainer, model: Any, pending: _Pending) -> list[StagedFile]:
        """The weights as ``save_pretrained`` shards them; the small JSON/args files written now."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers import PreTrainedModel

        state_dict = model.state_dict()
        if isinstance(model, PreTrainedModel):
            state_dict = _hf_weights(model, state_dict)
            model.config.save_pretrained(pending.staging)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(pending.staging)
        split = split_torch_state_dict_into_shards(
            state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=self.max_shard_size
        )
        files = [
            StagedFile(os.path.join(pending.staging, filename),
                       {name: state_dict[name] for name in names}, "safetensors",
                       defer="model", mode=0o644)
            for filename, names in split.filename_to_tensors.items()
        ]
        if split.is_sharded:
            index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
            if isinstance(model, PreTrainedModel):
                index["metadata"]["total_parameters"] = model.num_parameters()
            with open(os.path.join(pending.staging, "model.safetensors.index.json"), "w",
                      encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        processor = trainer.processing_class
        if processor is not None:
            processor.save_pretrained(pending.staging)
        torch.save(trainer.args, os.path.join(pending.staging, "training_args.bin"))
        return files

    def _training_state_files(self, trainer: Trainer, pending: _Pending) -> list[StagedFile]:
        def file(obj: object, name: str, defer: Literal["optimizer"] | None = None) -> StagedFile:
            return StagedFile(os.path.join(pending.staging, name), obj, "torch", defer=defer)

        # Only optimizer.step() changes the optimizer's state: its copy may overlap the backward.
        files = [file(trainer.optimizer.state_dict(), "optimizer.pt", defer="optimizer")]
        if trainer.lr_scheduler is not None:
            files.append(file(trainer.lr_scheduler.state_dict(), "scheduler.pt"))
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            files.append(file(scaler.state_dict(), "scaler.pt"))
        # Same entries as Trainer._save_rng_state (transformers 5.x, single process).
        rng: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.random.get_rng_state()
        files.append(file(rng, "rng_state.pth"))
        return files

    def _finish(self, args: Any, state: Any) -> None:
        """Add trainer_state.json to the staged checkpoint and queue its publication."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        from transformers.trainer_callback import ExportableState

        trainer = self._find_trainer()
        control_state = pending.control_state
        for cb in trainer.callback_handler.callbacks + [trainer.control]:
            if isinstance(cb, ExportableState):
                # As Trainer._save_checkpoint: the state of each stateful callback.
                cb_state = control_state if cb is trainer.control and control_state else cb.state()
                name = cb.__class__.__name__
                if isinstance(state.stateful_callbacks.get(name), list):
                    state.stateful_callbacks[name].append(cb_state)
                else:
                    state.stateful_callbacks[name] = cb_state
        best = None
        if state.best_global_step:
            best = os.path.join(args.output_dir, f"checkpoint-{state.best_global_step}")
            if os.path.exists(best) or best == pending.final:
                state.best_model_checkpoint = best
        state.save_to_json(os.path.join(pending.staging, "trainer_state.json"))
        limit = args.save_total_limit
        self._publish = self._submit_publish(pending, limit, state.best_model_checkpoint)

    def _submit_publish(self, pending: _Pending, limit: int | None, best: str | None) -> SaveHandle:
        def publish(_: staging.Snapshot) -> str:
            for handle in pending.files:  # written before this job: same writer thread, in order
                exc = handle.exception()
                if exc is not None:
                    raise exc  # the original failure; checkpoint-N is not published
            path = publish_directory(pending.staging, pending.final)
            rotate_published(os.path.dirname(path), limit, best)
            if self.on_committed is not None:
                self.on_committed(path)
            with self._lock:
                self._published.append(pending.step)
            return path

        self._saver.reserve()
        try:
            empty = staging.stage({}, pool=self._saver.pool, pickle_module=pickle, pickle_protocol=2)
        except BaseException:
            self._saver.cancel_reservation()
            raise
        return self._saver.submit(empty, publish, pending.final)

    def _find_trainer(self) -> Trainer:
        if self._trainer is None:
            # Callbacks are not given the Trainer; the event was called from one of
            # its methods, so the nearest frame whose `self` is a Trainer is ours.
            frame = sys._getframe(1)
            while frame is not None and self._trainer is None:
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, Trainer) and self in candidate.callback_handler.callbacks:
                    self._trainer = candidate
                frame = frame.f_back  # type: ignore[assignment]
            if self._trainer is None:
                raise RuntimeError(
                    "AsyncSaveCallback could not find its Trainer; pass it explicitly: "
                    "AsyncSaveCallback(trainer=trainer) and trainer.add_callback(...)"
                )
        return self._trainer


def _is_pretrained(model: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _hf_weights(model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: ignored keys and tied aliases dropped."""
    from transformers import modeling_utils

    for key in model._keys_to_ignore_on_save or ():
        state_dict.pop(key, None)
    state_dict = modeling_utils.remove_tied_weights_from_state_dict(state_dict, model)
    revert = getattr(modeling_utils, "revert_weight_conversion", None)
    if revert is not None:
        state_dict = revert(model, state_dict)
    return state_dict
