"""Drop-ins for the training frameworks people use; each module imports its framework.

* :mod:`torchaux.integrations.lightning` - ``TorchauxCheckpointIO``, a Lightning
  ``CheckpointIO`` (``lightning`` or ``pytorch_lightning``, Trainer and Fabric);
* :mod:`torchaux.integrations.hf` - ``AsyncSaveCallback`` for ``transformers.Trainer``;
* :mod:`torchaux.integrations.accelerate` - ``register_async_weights(accelerator)``:
  ``Accelerator.save_state`` without waiting for the model weights;
* :mod:`torchaux.integrations.staged_files` - the files of one framework checkpoint
  staged together and written by one writer job (used by the two above).

Nothing is re-exported here, so ``import torchaux`` never imports a framework.
"""

__all__: list[str] = []
