"""The ``TorchDispatchMode`` that sees every ATen call and reports the FLOPs of counted ones.

Why a dispatch mode: it sits below autograd, so it sees the kernels that
actually run -- ``linear`` arrives as ``addmm``, attention as the fused kernel
the backend picked -- and autograd carries the mode stack into backward, so
backward kernels (``mm``, ``convolution_backward``, ``*_attention_backward``)
reach it too, on whichever thread runs them.  The same mechanism as torch
2.13's ``FlopCounterMode``, kept separate from the counter's state
(``counter.py``) so that it only reports, through two callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchaux.training.flops.coverage import is_matmul_class
from torchaux.training.flops.registry import formula_for

__all__ = ["CountingMode"]

_aten = torch.ops.aten
# Metadata queries that tensor subclasses with custom size policies (nested
# jagged tensors) send through the mode; torch 2.13's FlopCounterMode declines
# them (returns NotImplemented) so the subclass answers itself.  We do the same.
_METADATA_OPS = frozenset(
    {
        _aten.sym_is_contiguous.default,
        _aten.is_contiguous.default,
        _aten.is_contiguous.memory_format,
        _aten.is_strides_like_format.default,
        _aten.is_non_overlapping_and_dense.default,
        _aten.size.default,
        _aten.sym_size.default,
        _aten.stride.default,
        _aten.sym_stride.default,
        _aten.storage_offset.default,
        _aten.sym_storage_offset.default,
        _aten.numel.default,
        _aten.sym_numel.default,
        _aten.dim.default,
        torch.ops.prim.layout.default,
    }
)


# Per-overload caches: the handler runs for every ATen call of a counted step,
# and asking the dispatcher (or formatting a name) each time was a measurable
# part of the counter's overhead (see overhead.py).
_decomposable_cache: dict[Any, bool] = {}
_name_cache: dict[Any, str] = {}


def _decomposable(func: Any) -> bool:
    """Whether ``func`` has a CompositeImplicitAutograd kernel (what ``decompose`` runs)."""
    known = _decomposable_cache.get(func)
    if known is None:
        known = func is not torch.ops.prim.device.default and func._can_decompose()
        _decomposable_cache[func] = known
    return known


def _op_name(func: Any) -> str:
    name = _name_cache.get(func)
    if name is None:
        name = _name_cache[func] = str(func.overloadpacket)
    return name


class CountingMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Runs every op unchanged and reports the FLOPs of those with a formula.

    Example:
        >>> counts = []
        >>> with CountingMode(lambda op, flops: counts.append((op, flops)), print):
        ...     _ = torch.ones(3, 4) @ torch.ones(4, 3)
        >>> counts
        [('aten.mm', 72)]
    """

    # Let higher-order ops (flex_attention, cond, ...) reach us instead of
    # raising; we count the ones with a formula and run the others uncounted.
    supports_higher_order_operators = True

    def __init__(
        self, record: Callable[[str, int], None], note_uncounted: Callable[[str], None]
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._record = record
        self._note_uncounted = note_uncounted

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Off during compilation, on while compiled code runs: Dynamo then
        # neither skips frames nor caches a skip (torch/_dynamo/convert_frame.py
        # checks any_torch_dispatch_mode_on_stack, which honours this flag).
        return True

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        formula = formula_for(func)
        if isinstance(func, torch._ops.HigherOrderOperator):
            out = func(*args, **kwargs)
            self._report(str(func), None if formula is None else formula(args, kwargs, out))
            return out
        if formula is None:
            if func in _METADATA_OPS:
                return NotImplemented
            # CompositeImplicit ops reach the mode undecomposed when autograd is
            # off (inference_mode: aten.linear arrives whole, pytorch #126268);
            # decomposing under the mode exposes the addmm/mm inside.
            if _decomposable(func):
                with self:
                    return func.decompose(*args, **kwargs)
            out = func(*args, **kwargs)
            name = _op_name(func)
            if is_matmul_class(name):
                # A GEMM-like kernel nobody wrote a formula for: never drop it silently.
                self._note_uncounted(name)
            return out
        out = func(*args, **kwargs)
        self._report(_op_name(func), formula(args, kwargs, out))
        return out

    def _report(self, name: str, flops: int | None) -> None:
        if flops is None:  # the formula could not tell (e.g. an unknown nested layout)
            self._note_uncounted(name)
        else:
            self._record(name, flops)
