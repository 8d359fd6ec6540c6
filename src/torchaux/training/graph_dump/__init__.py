"""Tensor dumps that survive ``torch.compile(fullgraph=True)`` and CUDA-graph capture.

* :mod:`~torchaux.training.graph_dump.dump` — the custom op and ``save_graph_tensor``;
* :mod:`~torchaux.training.graph_dump.cuda` — the CUDA-graph path (host callbacks at replay).
"""

from torchaux.training.graph_dump.dump import save_graph_tensor, save_npugraph_tensor

__all__ = ["save_graph_tensor", "save_npugraph_tensor"]
