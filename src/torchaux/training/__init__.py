"""Training utilities: tensor combining, FLOP counting, thread affinity, graph-safe dumps."""

from torchaux.training.affinity import (
    available_cores,
    cores_excluding,
    get_thread_affinity,
    reset_thread_affinity,
    set_thread_affinity,
    thread_affinity,
)
from torchaux.training.combine import (
    combine_tensors,
    get_part_combined_tensor,
    get_storage_size,
    is_combined_tensor_valid,
    npu_combine_tensors,
)
from torchaux.training.flops import FlopsBreakdown, FlopsCounter, mfu
from torchaux.training.graph_dump.dump import save_graph_tensor, save_npugraph_tensor

__all__ = [
    "combine_tensors",
    "npu_combine_tensors",
    "get_part_combined_tensor",
    "is_combined_tensor_valid",
    "get_storage_size",
    "set_thread_affinity",
    "reset_thread_affinity",
    "thread_affinity",
    "get_thread_affinity",
    "available_cores",
    "cores_excluding",
    "save_graph_tensor",
    "save_npugraph_tensor",
    "FlopsCounter",
    "FlopsBreakdown",
    "mfu",
]
