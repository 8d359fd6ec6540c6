"""FLOP formulas for backend-specific and fused kernels that plain eager training never runs.

Why: CPU Inductor with ``freezing=True`` replaces ``addmm`` by ``mkl._mkl_linear``
(float32) or ``mkldnn._linear_pointwise`` (bf16/fp16) and convolutions by
``mkldnn._convolution_pointwise``; inference fast paths of
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` run one fused
ATen kernel each; mixture-of-experts layers call ``torch._grouped_mm``.
``torch.utils.flop_counter`` (torch 2.13) counts none of them, so a counter
that trusts it silently reports a fraction of the work.

How the list was found: a walk of every operator registered with the
dispatcher (``torch._C._dispatch_get_all_op_names()``) in the ``aten``,
``prims``, ``mkl``, ``mkldnn``, ``onednn``, ``quantized`` and ``sparse``
namespaces, filtered by the matmul-class name rule of ``coverage.py``, minus
CompositeImplicit operators (the counting mode decomposes those into counted
ones) and weight packing or reordering helpers.  ``prims`` has no
matmul-class operator.  Operators found but without a formula here (sparse and
semi-structured GEMMs, RNN kernels, packed quantized convolutions, Triton-only
attention) are reported as uncounted by the counter, never silently dropped.

All formulas count 2 FLOPs per multiply-add and ignore bias and activation
work, as ``formulas.py`` does, so a fused kernel counts what its unfused
decomposition counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchaux.training.flops.formulas import conv_backward_flops, conv_flops, matmul_flops

__all__ = ["FUSED_FORMULAS"]

#: ``formula(args, kwargs, out) -> FLOPs`` (None: cannot tell, reported uncounted).
Formula = Callable[[tuple[Any, ...], dict[str, Any], Any], "int | None"]


def _out_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _linear_like(x_at: int) -> Formula:
    """``2 * K * numel(out)``: any ``x @ W^T`` whose input ``x`` ends in the contracted dim.

    True for every linear kernel whatever the weight's (packed) layout, since
    each output element is one dot product over ``x``'s last dim.
    """
    return lambda args, kwargs, out: 2 * args[x_at].shape[-1] * _out_tensor(out).numel()


def _mm_at(i: int) -> Formula:
    return lambda args, kwargs, out: matmul_flops(args[i].shape, args[i + 1].shape)


def _grouped_mm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """``_grouped_mm``/``_scaled_grouped_mm``: per-group GEMMs, shapes per the op's docs.

    2d x 3d (tokens grouped by ``offs``), 3d x 2d and 3d x 3d: every output
    element is a dot product over ``a``'s last dim.  2d x 2d groups the
    contracted dim itself (the weight gradient of MoE): ``2*M*K_total*N``.
    """
    a, b = args[0], args[1]
    if a.dim() == 2 and b.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * a.shape[-1] * _out_tensor(out).numel()


def _foreach_mm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return sum(matmul_flops(a.shape, b.shape) for a, b in zip(args[0], args[1], strict=True))


def _conv_at(x_at: int, w_at: int, *, transposed: bool = False) -> Formula:
    def formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        x, w = args[x_at], args[w_at]
        return conv_flops(x.shape, w.shape, _out_tensor(out).shape, transposed=transposed)

    return formula


def _conv_tbc(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # conv_tbc(input (T, B, C_in), weight (K, C_in, C_out), bias, pad) -> (T', B, C_out).
    w = args[1]
    return 2 * out.numel() * w.shape[0] * w.shape[1]


def _backward_with_mask(transposed_at: int | None, mask_at: int) -> Formula:
    """``convolution_backward``-like ops: (grad_out, input, weight, ..., output_mask)."""

    def formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        mask = args[mask_at] if len(args) > mask_at else kwargs.get("output_mask", (1, 1, 1))
        transposed = bool(args[transposed_at]) if transposed_at is not None else False
        grads = list(out) + [None] * 3
        return conv_backward_flops(
            args[0].shape,
            args[1].shape,
            args[2].shape,
            transposed=transposed,
            grad_input_shape=grads[0].shape if mask[0] and grads[0] is not None else None,
            grad_weight_shape=grads[1].shape if mask[1] and grads[1] is not None else None,
        )

    return formula


def _linear_backward(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # (mkldnn_)linear_backward(input, grad_output, weight, output_mask): grad_input is
    # grad_out @ W (2*N per input element), grad_weight grad_out^T @ x (2*K per grad_out
    # element) -- the two mm of an unfused linear backward.
    x, grad_out, weight, mask = args[0], args[1], args[2], args[3]
    flops = 2 * weight.shape[0] * x.numel() if mask[0] else 0
    return flops + (2 * x.shape[-1] * grad_out.numel() if mask[1] else 0)


def _linear_backward_input(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # mkldnn_linear_backward_input(input_size, grad_output, weight)
    return 2 * args[1].shape[-1] * _out_tensor(out).numel()


def _linear_backward_weights(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # mkldnn_linear_backward_weights(grad_output, input, weight, bias_defined)
    return 2 * args[1].shape[-1] * args[0].numel()


def _rnn_layer(backward: bool) -> Formula:
    """``mkldnn_rnn_layer`` (CPU LSTM) and its backward: one layer over a whole sequence.

    Forward: every token multiplies by ``W_ih`` and ``W_hh`` (``4H x I`` and
    ``4H x H`` for an LSTM), what the per-step ``addmm`` of an unfused cell
    counts: ``2 * tokens * (numel(W_ih) + numel(W_hh))``.  Backward: the input
    and weight gradients of both products, twice the forward (the kernel
    computes the input gradient even when the input needs none).
    """

    def formula(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
        x, w_ih, w_hh = args[0], args[1], args[2]
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        forward = 2 * tokens * (w_ih.numel() + w_hh.numel())
        return 2 * forward if backward else forward

    return formula


def _sequence_lengths(x: torch.Tensor) -> list[int] | None:
    """Per-sequence lengths of a (batch, seq, embed) input, dense or nested; None if unknown."""
    if x.is_nested:
        sizes = getattr(x, "_nested_tensor_size", None)
        if sizes is None:
            return None
        return [int(row[0]) for row in sizes().tolist()]
    if x.dim() == 3:
        return [int(x.shape[1])] * int(x.shape[0])
    if x.dim() == 2:  # unbatched (seq, embed)
        return [int(x.shape[0])]
    return None


def _encoder_layer(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int | None:
    """``_transformer_encoder_layer_fwd``: what the unfused layer counts, per sequence.

    Per token: in-projection ``2*E*3E``, out-projection ``2*E*E``, feed-forward
    ``2*E*F`` twice; per sequence of length S, attention ``4*S*S*E`` (the
    ``sdpa_flops`` of all heads).  Source of the computation: the eager branch
    of ``TransformerEncoderLayer.forward`` in torch 2.13 ``torch/nn/modules/transformer.py``.
    """
    lengths = _sequence_lengths(args[0])
    if lengths is None:
        return None
    embed, ffn = int(args[1]), int(args[14].shape[0])
    tokens = sum(lengths)
    per_token = 2 * embed * 3 * embed + 2 * embed * embed + 2 * 2 * embed * ffn
    return tokens * per_token + sum(4 * s * s * embed for s in lengths)


def _native_mha(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int | None:
    """``_native_multi_head_attention``: projections plus attention of all heads.

    ``2*E*E`` per query token (q and out projections each) and per key token
    (k and v projections each), and ``4*Sq*Sk*E`` per sequence: what the eager
    ``F.multi_head_attention_forward`` counts (torch 2.13 ``torch/nn/functional.py``).
    """
    q_lengths, k_lengths = _sequence_lengths(args[0]), _sequence_lengths(args[1])
    if q_lengths is None or k_lengths is None or len(q_lengths) != len(k_lengths):
        return None
    embed = int(args[3])
    projections = 2 * embed * embed * (2 * sum(q_lengths) + 2 * sum(k_lengths))
    attention = sum(4 * s_q * s_k * embed for s_q, s_k in zip(q_lengths, k_lengths, strict=True))
    return projections + attention


def _table() -> dict[str, Formula]:
    table: dict[str, Formula] = {
        "aten._addmm_activation": _mm_at(1),
        "aten._scaled_mm_v2": _mm_at(0),
        "aten._grouped_mm": _grouped_mm,
        "aten._scaled_grouped_mm": _grouped_mm,
        "aten._foreach_mm": _foreach_mm,
        "aten.conv_tbc": _conv_tbc,
        "aten._transformer_encoder_layer_fwd": _encoder_layer,
        "aten._native_multi_head_attention": _native_mha,
        "aten.linear_backward": _linear_backward,
        "aten.mkldnn_linear_backward": _linear_backward,
        "aten.mkldnn_linear_backward_input": _linear_backward_input,
        "aten.mkldnn_linear_backward_weights": _linear_backward_weights,
        "aten.convolution_backward_overrideable": _backward_with_mask(6, 9),
        "aten._slow_conv2d_backward": _backward_with_mask(None, 6),
        "mkldnn._convolution_pointwise": _conv_pointwise,
        "mkldnn._convolution_pointwise_": _conv_at(1, 2),
        "mkldnn._convolution_transpose_pointwise": _conv_at(0, 1, transposed=True),
        "quantized.matmul": _mm_at(0),
        "aten.mkldnn_rnn_layer": _rnn_layer(backward=False),
        "aten.mkldnn_rnn_layer_backward": _rnn_layer(backward=True),
        "aten._scaled_grouped_mm_v2": _grouped_mm,
        # In-place variants are packets of their own (torch 2.13 counts none of them).
        "aten.addmm_": _mm_at(1),
        "aten.baddbmm_": _mm_at(1),
        "aten.addbmm_": _mm_at(1),
        "aten.addmv_": _mm_at(1),
        "aten.vdot": _mm_at(0),
    }
    linear_ops: Sequence[str] = (
        "mkl._mkl_linear",
        "mkldnn._linear_pointwise",
        "aten.mkldnn_linear",
        "aten._mixed_dtypes_linear",
        "aten._weight_int8pack_mm",
        "aten._weight_int4pack_mm",
        "aten._weight_int4pack_mm_for_cpu",
        "aten._weight_int4pack_mm_with_scales_and_zeros",
        "aten._dyn_quant_matmul_4bit",
        "aten.fbgemm_linear_fp16_weight",
        "aten.fbgemm_linear_fp16_weight_fp32_activation",
        "aten.fbgemm_linear_int8_weight",
        "aten.fbgemm_linear_int8_weight_fp32_activation",
        "onednn.qlinear_pointwise",
        "onednn.linear_dynamic_fp16",
        "onednn.linear_relu_dynamic_fp16",
        "quantized.linear",
        "quantized.linear_relu",
        "quantized.linear_dynamic",
        "quantized.linear_relu_dynamic",
        "quantized.linear_dynamic_fp16",
        "quantized.linear_relu_dynamic_fp16",
        "quantized.linear_leaky_relu",
        "quantized.linear_tanh",
    )
    table |= {name: _linear_like(0) for name in linear_ops}
    plain_convs = (
        "_conv_depthwise2d", "conv_depthwise3d", "slow_conv3d_forward", "slow_conv3d",
        "slow_conv_dilated2d", "slow_conv_dilated3d", "thnn_conv2d", "miopen_convolution",
        "miopen_depthwise_convolution", "miopen_convolution_relu", "miopen_convolution_add_relu",
        "cudnn_convolution_relu", "cudnn_convolution_add_relu", "_nnpack_spatial_convolution",
        "_mps_convolution",
    )  # fmt: skip
    table |= {f"aten.{name}": _conv_at(0, 1) for name in plain_convs}
    transposed_convs = (
        "slow_conv_transpose2d", "slow_conv_transpose3d", "cudnn_convolution_transpose",
        "miopen_convolution_transpose", "_mps_convolution_transpose",
    )  # fmt: skip
    table |= {f"aten.{name}": _conv_at(0, 1, transposed=True) for name in transposed_convs}
    return table


def _conv_pointwise(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # _convolution_pointwise(X, W, B, ...) and its .binary overload (X, other, W, B, ...):
    # the .binary one has the extra tensor before the weight.
    w_at = 2 if isinstance(args[2], torch.Tensor) and args[2].dim() == args[0].dim() else 1
    return conv_flops(args[0].shape, args[w_at].shape, _out_tensor(out).shape)


#: Qualified packet name (``"mkl._mkl_linear"``) -> formula; registered by ``registry.py``.
FUSED_FORMULAS: dict[str, Formula] = _table()
