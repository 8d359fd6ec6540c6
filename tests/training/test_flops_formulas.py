"""Tests for torchaux.training.flops.formulas, .registry and .mfu: closed forms and per-op entries.

Hand-computed numbers (2 FLOPs per multiply-add) pin each formula; the
per-op entries are driven with meta tensors, so CUDA-only kernels (flash,
efficient, cuDNN attention) are checked on a CPU box too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchaux.training.flops.formulas import (
    conv_backward_flops,
    conv_flops,
    matmul_flops,
    sdpa_backward_flops,
    sdpa_flops,
)
from torchaux.training.flops.mfu import mfu
from torchaux.training.flops.registry import formula_for, registered_ops

aten = torch.ops.aten


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _apply(op: Any, args: tuple[Any, ...], out: Any = None) -> int:
    formula = formula_for(op)
    assert formula is not None, f"{op} has no formula"
    return formula(args, {}, out)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((3, 4), (4, 3), 72),  # torch_npu's doc example
        ((4,), (4,), 8),  # dot
        ((5, 4), (4,), 40),  # mv
        ((4,), (4, 6), 48),  # vector @ matrix
        ((7, 3, 4), (7, 4, 5), 2 * 7 * 3 * 4 * 5),  # bmm
        ((2, 1, 3, 4), (5, 4, 6), 2 * 2 * 5 * 3 * 4 * 6),  # broadcast batch dims
    ],
)
def test_matmul_flops(a: tuple[int, ...], b: tuple[int, ...], expected: int) -> None:
    """matmul_flops is 2 * k * numel(broadcast output) for every operand rank."""
    assert matmul_flops(a, b) == expected


def test_matmul_flops_rejects_bad_shapes() -> None:
    """Mismatched contracted dims and 0-d operands raise ValueError naming the shapes."""
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 3\)"):
        matmul_flops((3, 4), (5, 3))
    with pytest.raises(ValueError, match="at least 1 dim"):
        matmul_flops((), (3,))


def test_conv_flops_closed_forms() -> None:
    """Plain, transposed and grouped convolutions match hand-computed counts."""
    assert conv_flops((2, 3, 10, 10), (8, 3, 3, 3), (2, 8, 10, 10)) == 86400
    assert conv_flops((1, 4, 5, 5), (4, 2, 3, 3), (1, 2, 7, 7), transposed=True) == 3600
    assert conv_flops((1, 4, 5, 5), (6, 2, 3, 3), (1, 6, 3, 3)) == 1944


def test_conv_backward_counts_requested_gradients_only() -> None:
    """Input and weight gradients each cost one forward; skipped ones cost nothing."""
    shapes = ((2, 8, 10, 10), (2, 3, 10, 10), (8, 3, 3, 3))
    both = conv_backward_flops(*shapes, transposed=False, grad_input_shape=shapes[1],
                               grad_weight_shape=shapes[2])
    weight_only = conv_backward_flops(*shapes, transposed=False, grad_input_shape=None,
                                      grad_weight_shape=shapes[2])
    neither = conv_backward_flops(*shapes, transposed=False, grad_input_shape=None,
                                  grad_weight_shape=None)
    assert (both, weight_only, neither) == (2 * 86400, 86400, 0)


def test_sdpa_closed_forms() -> None:
    """Attention forward is 4*B*H*S^2*D and backward 2.5x that; GQA counts query heads."""
    q = (2, 4, 16, 8)
    assert sdpa_flops(q, q, q) == 65536
    assert sdpa_backward_flops(q, q, q) == 163840
    kv = (2, 2, 16, 8)
    assert sdpa_flops((2, 8, 16, 8), kv, kv) == 2 * 65536
    assert sdpa_flops((2, 4, 16, 8), (2, 4, 32, 8), (2, 4, 32, 4)) == 2 * 8 * 16 * 32 * (8 + 4)


def test_sdpa_rejects_incompatible_shapes() -> None:
    """Query heads that are no multiple of KV heads, or mismatched dims, raise ValueError."""
    with pytest.raises(ValueError, match="multiple"):
        sdpa_flops((2, 3, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8))
    with pytest.raises(ValueError, match="equal rank"):
        sdpa_flops((16, 8), (16, 8), (16, 8))


FUSED_ATTENTION = [
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
]


@pytest.mark.parametrize("name", FUSED_ATTENTION)
def test_fused_attention_entries(name: str) -> None:
    """Every fused SDPA kernel and its backward are registered with the SDPA formulas."""
    q, k, v = _meta(2, 8, 16, 8), _meta(2, 2, 32, 8), _meta(2, 2, 32, 4)
    assert _apply(getattr(aten, name), (q, k, v)) == sdpa_flops(q.shape, k.shape, v.shape)
    backward = getattr(aten, name + "_backward")
    grad_out = _meta(2, 8, 16, 4)
    assert _apply(backward, (grad_out, q, k, v)) == sdpa_backward_flops(q.shape, k.shape, v.shape)


def test_raw_kernels_take_batch_seq_heads_dim() -> None:
    """_flash/_efficient_attention_* read (B, S, H, D) operands, unlike the public SDPA ops."""
    q, k, v = _meta(2, 16, 8, 8), _meta(2, 32, 2, 8), _meta(2, 32, 2, 4)
    expected = sdpa_flops((2, 8, 16, 8), (2, 2, 32, 8), (2, 2, 32, 4))
    no_offsets = (None, None, 16, 32)
    assert _apply(aten._flash_attention_forward, (q, k, v, *no_offsets)) == expected
    assert _apply(aten._efficient_attention_forward, (q, k, v, None, *no_offsets)) == expected
    grad_out = _meta(2, 16, 8, 4)
    flash_bwd = (grad_out, q, k, v, grad_out, None, *no_offsets)
    assert _apply(aten._flash_attention_backward, flash_bwd) == sdpa_backward_flops(
        (2, 8, 16, 8), (2, 2, 32, 8), (2, 2, 32, 4)
    )


def test_jagged_attention_sums_real_sequence_lengths() -> None:
    """With cumulative offsets each sequence counts with its own length."""
    q, k, v = torch.empty(8, 4, 8), torch.empty(8, 4, 8), torch.empty(8, 4, 8)
    offsets = torch.tensor([0, 3, 8])
    args = (q, k, v, offsets, offsets, 5, 5)
    expected = sdpa_flops((1, 4, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)) + sdpa_flops(
        (1, 4, 5, 8), (1, 4, 5, 8), (1, 4, 5, 8)
    )
    assert _apply(aten._flash_attention_forward, args) == expected


def test_jagged_attention_without_values_assumes_max_length() -> None:
    """Meta offsets (tracing) have no values: every sequence counts at the maximum length."""
    q = _meta(8, 4, 8)
    args = (q, q, q, _meta(3), _meta(3), 5, 5)
    assert _apply(aten._flash_attention_forward, args) == 2 * sdpa_flops(
        (1, 4, 5, 8), (1, 4, 5, 8), (1, 4, 5, 8)
    )


def test_cudnn_convolution_is_never_transposed() -> None:
    """cudnn_convolution's 7th argument is `benchmark`, not `transposed`; it counts as a conv."""
    x, w, out = _meta(2, 3, 10, 10), _meta(8, 3, 3, 3), _meta(2, 8, 10, 10)
    args = (x, w, [1, 1], [1, 1], [1, 1], 1, True, False, False)
    assert _apply(aten.cudnn_convolution, args, out) == 86400


def test_registry_lists_ops_flop_counter_mode_misses() -> None:
    """The CPU attention pair and the vector products are in our registry."""
    ops = registered_ops()
    for name in ("_scaled_dot_product_flash_attention_for_cpu_backward", "mv", "dot", "addbmm"):
        assert f"aten.{name}" in ops


def test_mfu() -> None:
    """mfu divides achieved FLOP/s by the peak of all devices and rejects nonsense."""
    assert mfu(3.0e12, 0.5, 1.0e13) == pytest.approx(0.6)
    assert mfu(3.0e12, 0.5, 1.0e13, n_devices=2) == pytest.approx(0.3)
    for bad in ({"step_time_s": 0.0}, {"peak_flops_per_s": -1.0}, {"n_devices": 0}):
        kwargs = {"flops_per_step": 1.0, "step_time_s": 1.0, "peak_flops_per_s": 1.0} | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            mfu(**kwargs)  # type: ignore[arg-type]


def test_mfu_accepts_numpy_numbers_and_rejects_lists_clearly() -> None:
    """Review finding f16: numpy ints were rejected and a list raised a bare TypeError."""
    import numpy as np

    assert mfu(np.float64(3.0e12), 0.5, 1.0e13, n_devices=np.int64(2)) == pytest.approx(0.3)
    assert mfu(torch.tensor(3.0e12), 0.5, 1.0e13) == pytest.approx(0.6)
    with pytest.raises(TypeError, match="flops_per_step must be a real number, got list"):
        mfu([1, 2], 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flops_per_step must be a finite number"):
        mfu(10**400, 1, 1)
    with pytest.raises(ValueError, match="n_devices must be an int >= 1, got float"):
        mfu(1, 1, 1, n_devices=2.0)  # type: ignore[arg-type]
