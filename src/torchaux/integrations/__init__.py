"""Drop-ins for the training frameworks people use; each module imports its framework.

* :mod:`torchaux.integrations.lightning` - ``TorchauxCheckpointIO``, a Lightning
  ``CheckpointIO`` (``lightning`` or ``pytorch_lightning``, Trainer and Fabric);
* :mod:`torchaux.integrations.hf` - ``AsyncSaveCallback`` for ``transformers.Trainer``.

Nothing is re-exported here, so ``import torchaux`` never imports a framework.
"""

__all__: list[str] = []
