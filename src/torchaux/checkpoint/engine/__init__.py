"""The save engine: stage a consistent snapshot on the caller, write it in the background.

* :mod:`~torchaux.checkpoint.engine.staging` — the only code that reads live tensors;
* :mod:`~torchaux.checkpoint.engine.pool` — warm, reusable host buffers;
* :mod:`~torchaux.checkpoint.engine.fence` — the ``model=`` hooks that keep a deferred snapshot exact;
* :mod:`~torchaux.checkpoint.engine.saver` — the writer thread, handles and ``wait_saves``;
* :mod:`~torchaux.checkpoint.engine.process_saver` — the writer process over shared memory.
"""

from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle, wait_saves

__all__ = ["AsyncSaver", "SaveHandle", "wait_saves"]
