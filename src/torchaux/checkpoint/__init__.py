"""Checkpointing: consistent staging, background writing, atomic commit."""

from torchaux.checkpoint.api import save_async
from torchaux.checkpoint.engine.saver import AsyncSaver, SaveHandle, wait_saves

__all__ = ["save_async", "wait_saves", "AsyncSaver", "SaveHandle"]
