"""Distributed checkpoints on torch.distributed and DCP, on the torchaux engine.

* :mod:`~torchaux.distributed.api` - ``save_async``, ``save``, ``load``, ``load_full``;
* :mod:`~torchaux.distributed.writer` / :mod:`~torchaux.distributed.reader` - DCP's
  ``StorageWriter`` / ``StorageReader`` interfaces;
* :mod:`~torchaux.distributed.chunks` - one chunk read in place (no ``torch.load`` copy);
* :mod:`~torchaux.distributed.stager` - DCP's ``AsyncStager`` on the host pool;
* :mod:`~torchaux.distributed.commit` - the store vote and the atomic publish;
* :mod:`~torchaux.distributed.checksums`, :mod:`~torchaux.distributed.metadata`,
  :mod:`~torchaux.distributed.layout` - per-chunk checksums, safe metadata reading, the layout.

Importable only where torch.distributed is available.
"""

from torchaux.distributed.layout import EXTRAS_KEY
from torchaux.distributed.api import load, load_full, save, save_async
from torchaux.distributed.reader import SafeFullLoadPlanner, SafeLoadPlanner, StorageReader
from torchaux.distributed.stager import Stager
from torchaux.distributed.writer import StorageWriter

__all__ = [
    "save_async",
    "save",
    "load",
    "load_full",
    "StorageWriter",
    "StorageReader",
    "Stager",
    "SafeLoadPlanner",
    "SafeFullLoadPlanner",
    "EXTRAS_KEY",
]
