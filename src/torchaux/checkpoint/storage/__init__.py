"""Storage: the bytes' way to the disk and the atomic commit.

* :mod:`~torchaux.checkpoint.storage.commit` — temp file, fsync, rename, directory fsync: the
  only code that renames or deletes checkpoint files;
* :mod:`~torchaux.checkpoint.storage.direct_io` — ``O_DIRECT`` writes with a write-behind thread.
"""

from torchaux.checkpoint.storage.commit import atomic_write, remove_stale_temps

__all__ = ["atomic_write", "remove_stale_temps"]
