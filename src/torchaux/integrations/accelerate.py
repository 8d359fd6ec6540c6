"""``accelerator.save_state(dir)`` without waiting for the model weights: ``register_async_weights(accelerator)``.

Hugging Face ``accelerate`` has one public route into ``save_state``:
``Accelerator.register_save_state_pre_hook(hook)``, called as ``hook(models,
weights, output_dir)`` after the models' state dicts are taken and before
``save_accelerator_state`` writes them; a hook "can also be used to overwrite
model saving", by removing what it saved from ``weights``.  The hook
registered here:

1. waits for the previous checkpoint's weights (one in flight: host memory
   for one copy) and raises its failure, if any;
2. hands every model's state dict to torchaux as one save
   (:mod:`torchaux.integrations.staged_files`): pickled/indexed now, the bytes
   copied by the writer thread while the next forward runs, under the
   engine's ``model=`` fences when there is one model (each is copied at the
   call when there are several), then written as ``model.safetensors``
   (``model_1.safetensors``, ...; ``{"format": "pt"}`` metadata, tied aliases
   dropped as ``accelerate.utils.save`` drops them) or ``pytorch_model.bin``
   with ``safe_serialization=False``, each atomically (temp file, fsync,
   rename: a reader sees no file or the whole file);
3. empties ``weights``, so accelerate writes no model file itself.

What stays synchronous, by accelerate's design: the optimizer, scheduler,
sampler, scaler, RNG and custom-object files are written by
``save_accelerator_state`` after the hook, before ``save_state`` returns (the
hook is given the models' weights only).  So ``save_state`` returns while
``model.safetensors`` is still being written:

* ``accelerator.load_state`` in the same process waits for it (a load-state
  pre-hook is registered too), and ``AsyncWeights.wait()`` blocks until it is
  durable;
* a crash while it is written leaves the folder without its weights file;
  ``load_state`` of that folder then fails (accelerate looks for
  ``pytorch_model.bin`` and raises ``FileNotFoundError``), it never loads
  mixed weights: resume from the previous folder;
* ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=1)``
  is refused: ``save_state`` deletes the previous folder before the hook
  runs, while its weights may still be written (``total_limit >= 2`` only
  ever deletes folders whose weights are durable).

Distributed: only the process accelerate writes on (main, or each node's
local main with ``save_on_each_node``) writes; the others only drop
``weights``.  FSDP, DeepSpeed and Megatron-LM models are saved by accelerate's
own code before the hook (``weights`` is then empty) and stay synchronous.

Example (run in tests/integrations/test_accelerate.py)::

    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, optimizer)
    saves = register_async_weights(accelerator)
    ...
    accelerator.save_state("ckpt/step-100")  # returns before model.safetensors is written
    ...
    saves.wait()  # e.g. before the process exits or another one reads the folder
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import torch

from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle
from torchaux.integrations.staged_files import StagedFile, save_files

__all__ = ["AsyncWeights", "register_async_weights"]


class AsyncWeights:
    """The hooks :func:`register_async_weights` installed, and the weights save in flight."""

    def __init__(self, accelerator: Any, saver: AsyncSaver, safe_serialization: bool) -> None:
        self._accelerator = accelerator
        self._saver = saver
        self._safe = safe_serialization
        self._lock = threading.Lock()
        self._pending: SaveHandle | None = None
        self._handles = [
            accelerator.register_save_state_pre_hook(self._before_save),
            accelerator.register_load_state_pre_hook(self._before_load),
        ]

    def wait(self) -> None:
        """Block until the last weights file is durable; raise its failure (once)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()
        self._saver.wait()

    def remove(self) -> None:
        """Wait for the weights in flight, then unregister both hooks (``save_state`` writes them itself again)."""
        try:
            self.wait()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    # -- accelerate's hooks -----------------------------------------------------

    def _before_load(self, models: list[torch.nn.Module], input_dir: str) -> None:
        self.wait()  # the folder being loaded may be the one still being written

    def _before_save(self, models: list[torch.nn.Module], weights: list[dict[str, Any]],
                     output_dir: str) -> None:
        self.wait()  # one save in flight; an earlier failure is raised here
        if not weights:
            return  # FSDP / DeepSpeed / Megatron-LM: accelerate saved them itself
        acc = self._accelerator
        on_each_node = acc.project_configuration.save_on_each_node
        writes = acc.is_local_main_process if on_each_node else acc.is_main_process
        if writes:
            files = [self._file(state, output_dir, i) for i, state in enumerate(weights)]
            # Deferred copies are fenced on one module; several models are copied at the call.
            model = models[0] if len(models) == 1 and len(weights) == 1 else None
            handle = save_files(files, saver=self._saver, model=model)
            with self._lock:
                self._pending = handle
        weights.clear()  # accelerate's save_accelerator_state writes no model file now

    def _file(self, state: dict[str, Any], output_dir: str, i: int) -> StagedFile:
        from accelerate.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

        name = SAFE_WEIGHTS_NAME if self._safe else WEIGHTS_NAME
        if i > 0:
            name = name.replace(".", f"_{i}.")  # as save_accelerator_state names them
        path = os.path.abspath(os.path.join(output_dir, name))
        if not self._safe:
            return StagedFile(path, state, "torch", defer="model")
        if isinstance(state, OrderedDict):
            from accelerate.utils.other import clean_state_dict_for_safetensors

            # As accelerate.utils.save: one name per shared storage (tied weights).
            state = clean_state_dict_for_safetensors(OrderedDict(state))
        return StagedFile(path, dict(state), "safetensors", defer="model")


def register_async_weights(
    accelerator: Any, *, saver: AsyncSaver | None = None, safe_serialization: bool = True
) -> AsyncWeights:
    """Make ``accelerator.save_state`` write the models' weights in the background.

    Args:
        accelerator: an ``accelerate.Accelerator``.
        saver: the :class:`torchaux.AsyncSaver` to write with (default: one of
            its own).
        safe_serialization: ``True`` (accelerate's default): ``model.safetensors``;
            ``False``: ``pytorch_model.bin``.  Pass the value you give
            ``save_state`` (the hook is not told it).

    Returns:
        :class:`AsyncWeights`: ``wait()`` for the last weights file, ``remove()``
        to unregister.

    Raises:
        ImportError: ``accelerate`` is not installed.
        TypeError: ``accelerator`` is not an ``Accelerator``, or a bad argument.
        ValueError: a configuration this cannot make correct (the module docstring).
    """
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
    except ImportError:
        raise ImportError(
            "torchaux.integrations.accelerate needs accelerate: pip install 'torchaux[hf]'"
        ) from None
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    if saver is not None and not isinstance(saver, AsyncSaver):
        raise TypeError(f"saver must be a torchaux.AsyncSaver or None, got {type(saver).__name__}")
    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be a bool, got {type(safe_serialization).__name__}")
    config = accelerator.project_configuration
    if config.automatic_checkpoint_naming and config.total_limit == 1:
        raise ValueError(
            "register_async_weights cannot keep total_limit=1 correct: save_state deletes the "
            "previous checkpoint folder before its hook runs, while that folder's weights may "
            "still be written; use ProjectConfiguration(total_limit=2) or more"
        )
    if accelerator.distributed_type == DistributedType.XLA:
        raise ValueError(
            "register_async_weights does not support XLA (accelerate moves XLA weights to the "
            "CPU inside its own save); remove it for TPU runs"
        )
    return AsyncWeights(accelerator, saver or AsyncSaver(name="torchaux-accelerate-writer"),
                        safe_serialization)
