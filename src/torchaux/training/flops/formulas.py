"""Closed-form FLOP counts of matmuls, convolutions and attention, from shapes.

Why a module of its own: these are pure arithmetic that can be checked by hand
(``tests/training/test_flops_formulas.py`` pins each one), while deciding
*which* operator call maps to which formula lives in ``registry.py`` and the
interception, threads and state live in ``counter.py``.

Convention: one multiply-add is **2 FLOPs** everywhere (matmul, convolution and
attention alike), as in torch 2.13's ``torch/utils/flop_counter.py``; bias adds,
softmax and other elementwise work are not counted, again as there.  torch_npu
counts its fused attention as multiply-adds (1 per MAC) since its commit
7adfda61c; we do not follow that, so attention and matmul FLOPs add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

__all__ = [
    "matmul_flops",
    "conv_flops",
    "conv_backward_flops",
    "sdpa_flops",
    "sdpa_backward_flops",
]


def matmul_flops(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """FLOPs of ``a @ b`` for 1-D to N-D operands with broadcast batch dims.

    ``2 * k * numel(output)``: the rule of torch_npu's ``FlopCounter.cpp`` matmul
    helper, which reduces to torch's ``mm_flop``/``bmm_flop`` (``2*m*n*k``,
    ``2*b*m*n*k``) for 2-D and 3-D operands.

    Raises:
        ValueError: an operand is 0-D or the contracted dims differ.

    Example:
        >>> matmul_flops((3, 4), (4, 3))
        72
        >>> matmul_flops((2, 5, 3, 4), (4, 6))  # 10 batched (3, 4) @ (4, 6)
        1440
    """
    if len(a_shape) == 0 or len(b_shape) == 0:
        raise ValueError(f"matmul needs operands of at least 1 dim, got {a_shape} @ {b_shape}")
    k = a_shape[-1]
    k_b = b_shape[0] if len(b_shape) == 1 else b_shape[-2]
    if k != k_b:
        raise ValueError(
            f"matmul contracted dims differ: {tuple(a_shape)} @ {tuple(b_shape)} ({k} != {k_b}); "
            "pass shapes of operands torch.matmul would accept"
        )
    m = a_shape[-2] if len(a_shape) >= 2 else 1
    n = b_shape[-1] if len(b_shape) >= 2 else 1
    return 2 * k * m * n * _broadcast_numel(a_shape[:-2], b_shape[:-2])


def _broadcast_numel(a: Sequence[int], b: Sequence[int]) -> int:
    """Elements of the broadcast of two batch shapes (assumed compatible: the op ran)."""
    if len(a) < len(b):
        a, b = b, a
    tail = len(a) - len(b)
    return prod(a[:tail]) * prod(x if y == 1 else y for x, y in zip(a[tail:], b, strict=True))


def conv_flops(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    transposed: bool = False,
) -> int:
    """FLOPs of a (possibly transposed, grouped) N-d convolution, bias excluded.

    ``2 * N * prod(spatial) * prod(kernel) * W[0] * W[1]`` where ``spatial`` is
    the output's spatial dims, or the input's for a transposed convolution;
    ``W[1]`` is already ``C_in / groups``.  Source: ``conv_flop_count`` in torch
    2.13 ``torch/utils/flop_counter.py`` (torch_npu uses the whole output shape
    for transposed convolutions, which we do not follow).

    Example:
        >>> conv_flops((2, 3, 10, 10), (8, 3, 3, 3), (2, 8, 10, 10))
        86400
        >>> conv_flops((1, 4, 5, 5), (4, 2, 3, 3), (1, 2, 7, 7), transposed=True)
        3600
    """
    spatial = (x_shape if transposed else out_shape)[2:]
    return 2 * x_shape[0] * prod(spatial) * prod(w_shape[2:]) * w_shape[0] * w_shape[1]


def _swap01(shape: Sequence[int]) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    *,
    transposed: bool,
    grad_input_shape: Sequence[int] | None,
    grad_weight_shape: Sequence[int] | None,
) -> int:
    """FLOPs of ``convolution_backward`` for the gradients that were requested.

    The input gradient is a convolution of ``grad_out`` with the weight with
    ``transposed`` flipped; the weight gradient is a convolution with batch and
    channel dims swapped (``conv_backward_flop`` in torch 2.13
    ``torch/utils/flop_counter.py``).  ``None`` means "not requested".

    Example:
        >>> conv_backward_flops((2, 8, 10, 10), (2, 3, 10, 10), (8, 3, 3, 3), transposed=False,
        ...                     grad_input_shape=(2, 3, 10, 10), grad_weight_shape=(8, 3, 3, 3))
        172800
    """
    flops = 0
    if grad_input_shape is not None:
        flops += conv_flops(grad_out_shape, w_shape, grad_input_shape, transposed=not transposed)
    if grad_weight_shape is not None:
        lhs, rhs = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flops(_swap01(lhs), _swap01(rhs), _swap01(grad_weight_shape))
    return flops


def _attention_dims(
    q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]
) -> tuple[int, int, int, int, int]:
    """(batch*query_heads, Sq, Sk, Dq, Dv) of ``(..., heads, seq, dim)`` operands."""
    if not len(q_shape) == len(k_shape) == len(v_shape) >= 3:
        raise ValueError(
            f"attention expects (..., heads, seq, dim) operands of equal rank, got "
            f"q={tuple(q_shape)}, k={tuple(k_shape)}, v={tuple(v_shape)}"
        )
    h_q, s_q, d_q = q_shape[-3:]
    h_kv, s_k, d_k = k_shape[-3:]
    if d_k != d_q or v_shape[-2] != s_k or v_shape[-3] != h_kv or h_q % h_kv != 0:
        raise ValueError(
            f"incompatible attention shapes q={tuple(q_shape)}, k={tuple(k_shape)}, "
            f"v={tuple(v_shape)}: need equal q/k head dims, equal k/v lengths and query "
            "heads a multiple of key/value heads"
        )
    return prod(q_shape[:-3]) * h_q, s_q, s_k, d_q, v_shape[-1]


def sdpa_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Forward FLOPs of attention on ``(..., heads, seq, dim)`` operands.

    Two batched matmuls, ``Q K^T`` and ``P V``: ``2*BH*Sq*Sk*(Dq + Dv)``
    (``sdpa_flop_count`` in torch 2.13 ``torch/utils/flop_counter.py``).  Grouped
    query attention counts with the query heads; causal masks are not discounted.

    Example:
        >>> sdpa_flops((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
        65536
    """
    bh, s_q, s_k, d_q, d_v = _attention_dims(q_shape, k_shape, v_shape)
    return 2 * bh * s_q * s_k * (d_q + d_v)


def sdpa_backward_flops(
    q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]
) -> int:
    """Backward FLOPs of attention: five batched matmuls, 2.5x the forward for Dq == Dv.

    Recomputed ``Q K^T`` (Dq), ``dP = dO V^T`` and ``dV = P^T dO`` (Dv each),
    ``dQ = dS K`` and ``dK = dS^T Q`` (Dq each): ``2*BH*Sq*Sk*(3*Dq + 2*Dv)``
    (``sdpa_backward_flop_count`` in torch 2.13 ``torch/utils/flop_counter.py``).

    Example:
        >>> sdpa_backward_flops((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
        163840
    """
    bh, s_q, s_k, d_q, d_v = _attention_dims(q_shape, k_shape, v_shape)
    return 2 * bh * s_q * s_k * (3 * d_q + 2 * d_v)
