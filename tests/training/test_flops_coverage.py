"""Tests for torchaux.training.flops.coverage: no matmul-class op runs uncounted silently."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from torchaux.training.flops import FlopsCounter, registered_ops
from torchaux.training.flops.coverage import is_matmul_class

_LIB = torch.library.Library("torchaux_cov_test", "FRAGMENT")
_LIB.define("fused_gemm(Tensor a, Tensor b) -> Tensor")
_LIB.impl("fused_gemm", lambda a, b: a @ b, "CompositeExplicitAutograd")
_LIB.define("scale(Tensor a) -> Tensor")
_LIB.impl("scale", lambda a: a * 2, "CompositeExplicitAutograd")


@pytest.fixture
def counter() -> Iterator[FlopsCounter]:
    c = FlopsCounter()
    assert not c.is_running
    c.reset()
    yield c
    if c.is_running:
        c.stop()


def test_unknown_gemm_is_listed_and_warned_about_once(counter: FlopsCounter) -> None:
    a = torch.randn(4, 8)
    with pytest.warns(RuntimeWarning, match="torchaux_cov_test.fused_gemm ran but has no FLOP"):
        counter.start()
        torch.ops.torchaux_cov_test.fused_gemm(a, a.t())
        counter.stop()
    assert counter.breakdown().uncounted == ("torchaux_cov_test.fused_gemm",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second run must not warn again
        counter.start()
        torch.ops.torchaux_cov_test.fused_gemm(a, a.t())
        torch.ops.torchaux_cov_test.scale(a)  # not matmul-class: neither listed nor warned
        counter.stop()
    assert counter.breakdown().uncounted == ("torchaux_cov_test.fused_gemm",)


def test_formula_that_cannot_tell_reports_uncounted(counter: FlopsCounter) -> None:
    from torchaux.training.flops import register_formula

    _LIB.define("opaque_mm(Tensor a, Tensor b) -> Tensor")
    _LIB.impl("opaque_mm", lambda a, b: a @ b, "CompositeExplicitAutograd")
    register_formula(torch.ops.torchaux_cov_test.opaque_mm, lambda args, kwargs, out: None)
    a = torch.randn(2, 2)
    with pytest.warns(RuntimeWarning, match="opaque_mm"):
        counter.start()
        torch.ops.torchaux_cov_test.opaque_mm(a, a)
        counter.stop()
    assert counter.get_flops() == [0, 0]
    assert counter.breakdown().uncounted == ("torchaux_cov_test.opaque_mm",)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mkl._mkl_linear", True), ("aten._grouped_mm", True), ("aten.mkldnn_rnn_layer", True),
        ("aten._sparse_semi_structured_linear", True), ("onednn.qconv2d_pointwise", True),
        ("aten._transformer_encoder_layer_fwd", False), ("aten.relu", False),
        ("mkl._mkl_reorder_linear_weight", False), ("aten.upsample_bilinear2d", False),
        ("quantized.linear_prepack", False), ("aten.mvlgamma", False),
        ("aten.cummax", False), ("prims.convert_element_type", False),
    ],
)  # fmt: skip
def test_name_rule(name: str, expected: bool) -> None:
    assert is_matmul_class(name) is expected


def test_registry_walk_every_matmul_class_op_is_counted_or_known() -> None:
    """The walk that found the fused kernels, pinned: a new torch op of this class shows up here.

    Every dispatcher operator of the aten/prims/mkl/mkldnn namespaces whose name
    is matmul-class has a formula, is decomposed (CompositeImplicit) or is one
    of the kernels knowingly left to the uncounted report.
    """
    left_to_report = {
        "aten._cslt_sparse_mm", "aten._cudnn_attention_backward", "aten._cudnn_attention_forward",
        "aten._cudnn_rnn", "aten._cudnn_rnn_backward",
        "aten._flash_attention_forward_no_dropout_inplace", "aten._lstm_mps",
        "aten._scaled_dot_product_attention_math_for_mps", "aten._sparse_addmm",
        "aten._sparse_mm_reduce_impl", "aten._sparse_mm_reduce_impl_backward",
        "aten._sparse_semi_structured_addmm", "aten._sparse_semi_structured_linear",
        "aten._sparse_semi_structured_mm", "aten._sparse_sparse_matmul",
        "aten._thnn_fused_gru_cell", "aten._thnn_fused_gru_cell_backward",
        "aten._thnn_fused_lstm_cell", "aten._thnn_fused_lstm_cell_backward_impl",
        "aten._trilinear", "aten._triton_multi_head_attention", "aten._triton_scaled_dot_attention",
        "aten.hspmm", "aten.lstm_mps_backward", "aten.miopen_rnn", "aten.miopen_rnn_backward",
        "aten.mps_convolution_backward", "aten.mps_convolution_transpose_backward",
        "aten.quantized_gru", "aten.quantized_lstm", "aten.sparse_sampled_addmm", "aten.sspaddmm",
        "mkldnn_prepacked.conv2d_run",
        "aten.matmul_backward",  # nested-tensor matmul only
    }  # fmt: skip
    counted = set(registered_ops())
    missing = []
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, rest = qualified.split("::")
        if namespace not in ("aten", "prims", "mkl", "mkldnn", "mkldnn_prepacked"):
            continue
        name = f"{namespace}.{rest.split('.')[0]}"
        if not is_matmul_class(name) or name in counted or name in left_to_report:
            continue
        packet = getattr(getattr(torch.ops, namespace), rest.split(".")[0])
        default = getattr(packet, "default", None) or getattr(packet, packet.overloads()[0])
        if not default._can_decompose():
            missing.append(name)
    assert sorted(set(missing)) == []
