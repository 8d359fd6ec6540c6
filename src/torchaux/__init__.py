"""torchaux: trustworthy auxiliary training utilities for every PyTorch backend."""

from torchaux.checkpoint import AsyncSaver, SaveHandle, save_async, wait_saves
from torchaux.errors import (
    CheckpointError,
    DecryptionError,
    IntegrityError,
    SaveClosedError,
    UnsupportedFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "save_async",
    "wait_saves",
    "AsyncSaver",
    "SaveHandle",
    "CheckpointError",
    "IntegrityError",
    "DecryptionError",
    "UnsupportedFormatError",
    "SaveClosedError",
]
