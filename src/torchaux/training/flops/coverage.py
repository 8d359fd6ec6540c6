"""Which operators without a FLOP formula are matmul-class, and must be reported as uncounted.

Why: a counter that silently skips a GEMM it does not know reports a fraction
of the work (CPU Inductor with ``freezing=True`` turned 92 % of a model's
FLOPs into ``mkl._mkl_linear`` calls that counted 0).  Every operator that
runs under the counter, has no formula, is not decomposed into counted ones
and looks like a matmul, convolution, attention or recurrent kernel is
therefore listed in ``FlopsBreakdown.uncounted`` and warned about once per
process.

The rule is on the operator's name, because kernels carry no "does a GEMM"
flag: a name part ``mm``, ``bmm``, ``matmul``, ``linear``, ``conv``,
``convolution``, ``attention``, ``gemm``, ``dot``, ``mv``, ``lstm``, ``gru``,
``rnn`` (``_grouped_mm``, ``mkl._mkl_linear``, ``conv2d``, ...), minus weight
packing and reordering helpers and interpolation (``upsample_bilinear2d``),
which do no multiply-adds worth counting.  It was checked against every
operator the dispatcher knows in torch 2.13 (see ``fused_ops.py``).
"""

from __future__ import annotations

import re
import threading
import warnings
from typing import Any

__all__ = ["is_matmul_class", "warn_uncounted_once"]

_MATMUL_PART = re.compile(
    r"(?:^|_)(?:[a-z]*mm|matmul|(?:tri)?linear|conv|convolution|attention|gemm|v?dot|"
    r"addmv|mv|lstm|gru|rnn|qlinear|qconv)(?=_|$|\d)"
)
_NOT_COMPUTE = re.compile(
    r"prepack|unpack|_pack_|pack_gemm|pack_quantized|reorder|upsample|combination|"
    r"flatten_weight|_use_cudnn|quantize_weight|_sizes$|_choice|_search$"
)

_cache: dict[str, bool] = {}
_warned: set[str] = set()
_warned_lock = threading.Lock()


def is_matmul_class(op_name: str) -> bool:
    """Whether ``op_name`` (``"namespace.name"``) names a matmul-class kernel.

    Example:
        >>> is_matmul_class("mkl._mkl_linear"), is_matmul_class("aten._grouped_mm")
        (True, True)
        >>> is_matmul_class("aten.relu"), is_matmul_class("mkl._mkl_reorder_linear_weight")
        (False, False)
    """
    known = _cache.get(op_name)
    if known is None:
        name = op_name.rsplit(".", 1)[-1].lower()
        known = bool(_MATMUL_PART.search(name)) and not _NOT_COMPUTE.search(name)
        _cache[op_name] = known
    return known


def warn_uncounted_once(op_name: str, **extra: Any) -> None:
    """Warn (``RuntimeWarning``) the first time ``op_name`` runs uncounted in this process."""
    with _warned_lock:
        if op_name in _warned:
            return
        _warned.add(op_name)
    warnings.warn(
        f"FlopsCounter: {op_name} ran but has no FLOP formula, so its FLOPs are not counted "
        "(the totals are too low); it is listed in breakdown().uncounted. Register one with "
        "torchaux.training.flops.register_formula(torch.ops.<namespace>.<op>, formula).",
        RuntimeWarning,
        stacklevel=3,
    )
