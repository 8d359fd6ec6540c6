"""Which ATen operator is counted with which formula: the registry and its built-in entries.

Why: ``FlopCounterMode``'s registry in torch 2.13 misses kernels that real
programs run (the CPU fused attention pair, pytorch issue #195460; the
``_fused_attention_overrideable`` pair of out-of-tree backends; ``mv``,
``addmv``, ``dot``, ``addbmm``, ``_int_mm``), so we keep our own and let device
plugins add entries with :func:`register_formula`.

A formula receives the op's real ``args``, ``kwargs`` and output (tensors, not
shapes), so jagged attention can read sequence offsets.  It runs *after* the
op, which has already rejected inconsistent shapes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchaux.training.flops.formulas import (
    conv_backward_flops,
    conv_flops,
    matmul_flops,
    sdpa_backward_flops,
    sdpa_flops,
)
from torchaux.training.flops.fused_ops import FUSED_FORMULAS

__all__ = ["Formula", "register_formula", "formula_for", "registered_ops"]

#: ``formula(args, kwargs, out) -> FLOPs`` for one call of an operator; ``None``
#: when the call's FLOPs cannot be told (it is then reported as uncounted).
Formula = Callable[[tuple[Any, ...], dict[str, Any], Any], "int | None"]

_aten = torch.ops.aten
_registry: dict[Any, Formula] = {}
_registry_lock = threading.Lock()


# -- per-op formulas (args, kwargs, out) -----------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _mm(i: int) -> Formula:
    """Matmul formula on the operands at positions ``i`` and ``i + 1``."""
    return lambda args, kwargs, out: matmul_flops(args[i].shape, args[i + 1].shape)


def _conv(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # convolution/_convolution/convolution_overrideable: transposed is arg 6.
    transposed = bool(_arg(args, kwargs, 6, "transposed"))
    return conv_flops(args[0].shape, args[1].shape, out.shape, transposed=transposed)


def _conv_never_transposed(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # cudnn_convolution, mkldnn_convolution and _slow_conv2d_forward have no
    # ``transposed`` argument (torch 2.13's registry reads arg 6 there, which is
    # ``benchmark`` for cudnn_convolution); they are ordinary convolutions.
    return conv_flops(args[0].shape, args[1].shape, out.shape)


def _conv_backward(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    mask = _arg(args, kwargs, 10, "output_mask")
    return conv_backward_flops(
        args[0].shape,
        args[1].shape,
        args[2].shape,
        transposed=bool(_arg(args, kwargs, 7, "transposed")),
        grad_input_shape=out[0].shape if mask[0] else None,
        grad_weight_shape=out[1].shape if mask[1] else None,
    )


def _sdpa(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # Every _scaled_dot_product_*_attention forward starts with (query, key, value)
    # in (batch, heads, seq, dim) layout.
    return sdpa_flops(args[0].shape, args[1].shape, args[2].shape)


def _sdpa_backward(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # ... and every backward with (grad_out, query, key, value).
    return sdpa_backward_flops(args[1].shape, args[2].shape, args[3].shape)


def _lengths(offsets: torch.Tensor, max_len: int | None, packed_len: int) -> list[int]:
    """Sequence lengths from cumulative offsets; ``max_len`` each when they are not readable.

    Fake and meta tensors (tracing, ``FakeTensorMode``) carry no values, so every
    sequence is assumed to have the maximum length, as torch 2.13's
    ``_offsets_to_lengths`` does (an over-estimate); without a maximum, the
    packed length bounds it.
    """
    if type(offsets) is torch.Tensor and offsets.device.type != "meta":
        return [int(n) for n in offsets.diff().tolist()]
    return [int(packed_len if max_len is None else max_len)] * (offsets.shape[0] - 1)


def _bshd_attention_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cum_q: torch.Tensor | None,
    cum_k: torch.Tensor | None,
    max_q: int | None,
    max_k: int | None,
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(B, H, S, D) shapes for the raw flash/efficient kernels, one per jagged sequence.

    These kernels take (batch, seq, heads, dim) -- the public SDPA ops transpose
    dims 1 and 2 before calling them (pytorch
    ``aten/src/ATen/native/transformers/cuda/attention.cu``) -- or a packed
    (..., total_seq, heads, dim) with cumulative offsets (nested tensors and
    varlen attention).  torch 2.13's ``flop_counter.py`` feeds the dense layout
    unchanged to its (B, H, S, D) formula; we transpose it.
    """
    if cum_q is None or cum_k is None:
        yield (
            (q.shape[0], q.shape[2], q.shape[1], q.shape[3]),
            (k.shape[0], k.shape[2], k.shape[1], k.shape[3]),
            (v.shape[0], v.shape[2], v.shape[1], v.shape[3]),
        )
        return
    (h_q, d_q), (h_k, d_k), (h_v, d_v) = q.shape[-2:], k.shape[-2:], v.shape[-2:]
    lengths_q = _lengths(cum_q, max_q, q.shape[-3])
    lengths_k = _lengths(cum_k, max_k, k.shape[-3])
    for s_q, s_k in zip(lengths_q, lengths_k, strict=True):
        yield (1, h_q, s_q, d_q), (1, h_k, s_k, d_k), (1, h_v, s_k, d_v)


def _raw_attention(q_at: int, offsets_at: int, *, backward: bool) -> Formula:
    """Formula for ``_flash_attention_*``/``_efficient_attention_*``.

    ``q_at``: position of the query (1 in backward, after grad_out);
    ``offsets_at``: position of (cum_q, cum_k, max_q, max_k).
    """
    closed_form = sdpa_backward_flops if backward else sdpa_flops

    def formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        q, k, v = args[q_at : q_at + 3]
        cum_q, cum_k, max_q, max_k = args[offsets_at : offsets_at + 4]
        return sum(
            closed_form(*shapes)
            for shapes in _bshd_attention_shapes(q, k, v, cum_q, cum_k, max_q, max_k)
        )

    return formula


def _flex_backward(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # flex_attention_backward(query, key, value, out, logsumexp, grad_out, ...)
    return sdpa_backward_flops(args[0].shape, args[1].shape, args[2].shape)


# -- registry --------------------------------------------------------------------------


def _key(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket
    if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return target
    raise TypeError(
        f"register_formula: expected an operator such as torch.ops.aten.mm or "
        f"torch.ops.mylib.op.default (or a higher-order operator), got {target!r} of type "
        f"{type(target).__name__}"
    )


def register_formula(target: Any, formula: Formula, *, replace: bool = False) -> None:
    """Count ``target`` with ``formula`` from now on (all overloads of the op).

    Args:
        target: an ``OpOverloadPacket`` (``torch.ops.mylib.op``), one of its
            overloads, or a ``HigherOrderOperator``.
        formula: ``formula(args, kwargs, out) -> int``, called after the op ran
            with its real arguments (tensors, not shapes) and output.
        replace: allow replacing an existing formula (ours or a previous one).

    Raises:
        TypeError: ``target`` is not an operator.
        ValueError: ``target`` already has a formula and ``replace`` is False.

    Example:
        >>> lib = torch.library.Library("torchaux_doc", "FRAGMENT")
        >>> _ = lib.define("twice(Tensor x) -> Tensor")
        >>> register_formula(torch.ops.torchaux_doc.twice, lambda args, kwargs, out: out.numel())
        >>> formula_for(torch.ops.torchaux_doc.twice.default) is not None
        True
    """
    key = _key(target)
    with _registry_lock:
        if key in _registry and not replace:
            raise ValueError(
                f"{key} already has a FLOP formula; pass replace=True to override it"
            )
        _registry[key] = formula


def formula_for(op: Any) -> Formula | None:
    """The formula counting ``op`` (an overload, packet or higher-order op), or None.

    Example:
        >>> formula_for(torch.ops.aten.relu.default) is None
        True
    """
    key = op.overloadpacket if isinstance(op, torch._ops.OpOverload) else op
    return _registry.get(key)


def registered_ops() -> list[str]:
    """Names of every operator that has a formula, sorted.

    Example:
        >>> "aten._scaled_dot_product_flash_attention_for_cpu" in registered_ops()
        True
    """
    return sorted(str(key) for key in _registry)


def _register_builtins() -> None:
    mm_like = {"mm": 0, "bmm": 0, "mv": 0, "dot": 0, "_int_mm": 0, "_scaled_mm": 0}
    mm_like |= {"addmm": 1, "baddbmm": 1, "addbmm": 1, "addmv": 1}
    for name, first in mm_like.items():
        register_formula(getattr(_aten, name), _mm(first))
    for name in ("convolution", "_convolution", "convolution_overrideable"):
        register_formula(getattr(_aten, name), _conv)
    for name in ("cudnn_convolution", "mkldnn_convolution", "_slow_conv2d_forward"):
        register_formula(getattr(_aten, name), _conv_never_transposed)
    register_formula(_aten.convolution_backward, _conv_backward)
    sdpa_ops = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        # Missing from torch 2.13's registry (issue #195460): the CPU fused kernel.
        "_scaled_dot_product_flash_attention_for_cpu",
        # The hook out-of-tree backends (XPU, PrivateUse1) implement.
        "_scaled_dot_product_fused_attention_overrideable",
    )
    for name in sdpa_ops:
        register_formula(getattr(_aten, name), _sdpa)
        register_formula(getattr(_aten, name + "_backward"), _sdpa_backward)
    # _flash_attention_forward(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, ...),
    # _flash_attention_backward(grad_out, q, k, v, out, lse, cum_seq_q, cum_seq_k, ...),
    # _efficient_attention_forward(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_q, max_k, ...),
    # _efficient_attention_backward(grad_out, q, k, v, bias, out, cu_seqlens_q, ...).
    register_formula(_aten._flash_attention_forward, _raw_attention(0, 3, backward=False))
    register_formula(_aten._flash_attention_backward, _raw_attention(1, 6, backward=True))
    register_formula(_aten._efficient_attention_forward, _raw_attention(0, 4, backward=False))
    register_formula(_aten._efficient_attention_backward, _raw_attention(1, 6, backward=True))
    hops = torch.ops.higher_order
    # flex_attention(query, key, value, score_mod, block_mask, ...): block sparsity is
    # not discounted (torch 2.13 discounts only a compile-time "sparsity_hint").
    register_formula(hops.flex_attention, _sdpa)
    register_formula(hops.flex_attention_backward, _flex_backward)
    for qualified, formula in FUSED_FORMULAS.items():
        namespace, name = qualified.split(".", 1)
        # Operators of libraries this build lacks (MKL, fbgemm, MPS) are not registered.
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is not None:
            register_formula(packet, formula)


_register_builtins()
