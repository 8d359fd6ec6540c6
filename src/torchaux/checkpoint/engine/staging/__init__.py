"""Staging: the consistent snapshot, on the caller's thread (the only code that reads live tensors)."""

from torchaux.checkpoint.engine.staging.snapshot import (
    HostBufferPool,
    Snapshot,
    TensorLocation,
    fence_blocked_seconds,
    stage,
)

__all__ = ["HostBufferPool", "Snapshot", "TensorLocation", "fence_blocked_seconds", "stage"]
