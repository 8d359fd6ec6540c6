"""Mirror of ``torch_npu.utils``: port Ascend code by changing the import.

This package only re-exports; the implementations live in their own modules.
"""

from torchaux.checkpoint.api import save_async
from torchaux.training.affinity import reset_thread_affinity, set_thread_affinity
from torchaux.training.combine import (
    get_part_combined_tensor,
    is_combined_tensor_valid,
    npu_combine_tensors,
)
from torchaux.training.flops import FlopsCounter

__all__ = [
    "save_async",
    "npu_combine_tensors",
    "get_part_combined_tensor",
    "is_combined_tensor_valid",
    "FlopsCounter",
    "set_thread_affinity",
    "reset_thread_affinity",
]
