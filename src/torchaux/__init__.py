"""torchaux: trustworthy auxiliary training utilities for every PyTorch backend."""

from torchaux.checkpoint import AsyncSaver, SaveHandle, save_async, wait_saves
from torchaux.checkpoint.load import load_checkpoint, load_param_into_net
from torchaux.checkpoint.loader import load
from torchaux.checkpoint.save import save_checkpoint
from torchaux.manager import CheckpointManager
from torchaux.errors import (
    CheckpointError,
    DecryptionError,
    IntegrityError,
    SaveClosedError,
    UnsupportedFormatError,
)
from torchaux.training import (
    FlopsBreakdown,
    FlopsCounter,
    combine_tensors,
    get_part_combined_tensor,
    is_combined_tensor_valid,
    mfu,
    npu_combine_tensors,
    reset_thread_affinity,
    save_graph_tensor,
    save_npugraph_tensor,
    set_thread_affinity,
    thread_affinity,
)

__version__ = "0.1.0"

__all__ = [
    # checkpointing
    "save_async",
    "wait_saves",
    "AsyncSaver",
    "SaveHandle",
    "save_checkpoint",
    "load_checkpoint",
    "load_param_into_net",
    "load",
    "CheckpointManager",
    # errors
    "CheckpointError",
    "IntegrityError",
    "DecryptionError",
    "UnsupportedFormatError",
    "SaveClosedError",
    # training utilities
    "combine_tensors",
    "npu_combine_tensors",
    "get_part_combined_tensor",
    "is_combined_tensor_valid",
    "FlopsCounter",
    "FlopsBreakdown",
    "mfu",
    "set_thread_affinity",
    "reset_thread_affinity",
    "thread_affinity",
    "save_graph_tensor",
    "save_npugraph_tensor",
]
