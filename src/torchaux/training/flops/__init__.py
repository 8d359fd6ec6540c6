"""FLOP counting for training steps: counter, formulas, breakdown, MFU and overhead benchmark."""

from torchaux.training.flops.breakdown import FlopsBreakdown, OpFlops
from torchaux.training.flops.counter import FlopsCounter
from torchaux.training.flops.mfu import mfu
from torchaux.training.flops.overhead import measure_overhead
from torchaux.training.flops.registry import register_formula, registered_ops

__all__ = [
    "FlopsCounter",
    "FlopsBreakdown",
    "OpFlops",
    "mfu",
    "measure_overhead",
    "register_formula",
    "registered_ops",
]
