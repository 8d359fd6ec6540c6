"""Training utilities (tensor combining, FLOPs, affinity, graph dumps)."""

__all__: list[str] = []
