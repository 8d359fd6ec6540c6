"""Staging: the consistent snapshot, on the caller's thread (the only code that reads live tensors)."""

from torchaux.checkpoint.engine.pickler import TensorLocation
from torchaux.checkpoint.engine.pool import HostBufferPool
from torchaux.checkpoint.engine.staging.capture import stage
from torchaux.checkpoint.engine.staging.snapshot import Snapshot, fence_blocked_seconds

__all__ = ["HostBufferPool", "Snapshot", "TensorLocation", "fence_blocked_seconds", "stage"]
