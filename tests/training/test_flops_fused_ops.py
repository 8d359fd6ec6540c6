"""Tests for torchaux.training.flops.fused_ops: fused and backend kernels count what eager counts.

Each fused kernel is compared with the unfused computation it replaces, counted
by the same counter (and, where it counts, by ``FlopCounterMode``), so a formula
cannot simply restate itself.  The Inductor ``freezing=True`` end-to-end check
compiles and is marked slow; the kernels it produces are also called directly
here, which runs by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchaux.training.flops import FlopsCounter
from torchaux.training.flops.fused_ops import FUSED_FORMULAS


@pytest.fixture
def counter() -> Iterator[FlopsCounter]:
    c = FlopsCounter()
    assert not c.is_running
    c.reset()
    c.resume()
    yield c
    if c.is_running:
        c.stop()
    c.resume()


def _count(counter: FlopsCounter, step: Callable[[], object]) -> int:
    counter.start()
    try:
        step()
    finally:
        counter.stop()
    assert counter.breakdown().uncounted == ()
    model, total = counter.get_flops()
    assert model == total
    return total


def _upstream(step: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as mode:
        step()
    return int(mode.get_total_flops())


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs MKL")
def test_mkl_linear_counts_like_linear(counter: FlopsCounter) -> None:
    """What CPU Inductor with freezing=True runs for a float32 Linear."""
    x, w, b = torch.randn(16, 64), torch.randn(128, 64), torch.randn(128)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 16)
    fused = _count(counter, lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, 16))
    assert fused == _upstream(lambda: F.linear(x, w, b)) == 2 * 16 * 64 * 128


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_mkldnn_pointwise_kernels_count_like_eager(counter: FlopsCounter) -> None:
    x, w, b = torch.randn(2, 8, 64), torch.randn(128, 64), torch.randn(128)
    linear = _count(counter, lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], ""))
    assert linear == _upstream(lambda: F.linear(x, w, b))
    xc, wc = torch.randn(2, 3, 10, 10), torch.randn(8, 3, 3, 3)
    conv = _count(
        counter,
        lambda: torch.ops.mkldnn._convolution_pointwise(
            xc, wc, None, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        ),
    )
    assert conv == _upstream(lambda: F.conv2d(xc, wc, None, 1, 1)) == 86400


def test_addmm_activation_counts_like_addmm(counter: FlopsCounter) -> None:
    bias, a, b = torch.randn(16), torch.randn(4, 8), torch.randn(8, 16)
    fused = _count(counter, lambda: torch.ops.aten._addmm_activation(bias, a, b, use_gelu=True))
    assert fused == _upstream(lambda: torch.addmm(bias, a, b)) == 2 * 4 * 8 * 16


def test_grouped_mm_counts_like_a_loop_of_mm(counter: FlopsCounter) -> None:
    """MoE layouts of torch._grouped_mm: 2d x 3d (tokens grouped), 3d x 3d, 2d x 2d (wgrad)."""
    offs = torch.tensor([16, 32, 48, 64], dtype=torch.int32)
    a, b = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(4, 32, 16, dtype=torch.bfloat16)

    def loop_2d_3d() -> None:
        for g in range(4):
            _ = a[16 * g : 16 * (g + 1)] @ b[g]

    assert _count(counter, lambda: torch._grouped_mm(a, b, offs=offs)) == _upstream(loop_2d_3d)
    a3 = torch.randn(4, 8, 32, dtype=torch.bfloat16)
    assert _count(counter, lambda: torch._grouped_mm(a3, b)) == _upstream(lambda: a3 @ b)
    x, dy = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(64, 16, dtype=torch.bfloat16)

    def loop_2d_2d() -> None:  # per-group weight gradient: x_g^T-shaped slices of K
        for g in range(4):
            _ = x[:, 16 * g : 16 * (g + 1)] @ dy[16 * g : 16 * (g + 1)]

    assert _count(counter, lambda: torch._grouped_mm(x, dy, offs=offs)) == _upstream(loop_2d_2d)


def test_inplace_and_vector_variants(counter: FlopsCounter) -> None:
    a, b, c = torch.randn(4, 8), torch.randn(8, 16), torch.zeros(4, 16)
    assert _count(counter, lambda: c.addmm_(a, b)) == _upstream(lambda: torch.addmm(c, a, b))
    v = torch.randn(8)
    assert _count(counter, lambda: torch.vdot(v, v)) == 2 * 8
    pairs = ([a, b.t()], [b, a.t()])
    assert _count(counter, lambda: torch.ops.aten._foreach_mm(*pairs)) == _upstream(
        lambda: [x @ y for x, y in zip(*pairs, strict=True)]
    )


def _encoder() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()


def test_transformer_encoder_fast_path_counts_like_slow_path(counter: FlopsCounter) -> None:
    """no_grad eval runs one fused kernel; grad mode runs the unfused layer."""
    enc, x = _encoder(), torch.randn(2, 10, 32)
    with torch.no_grad():
        fast = _count(counter, lambda: enc(x))
    assert "aten._transformer_encoder_layer_fwd" in counter.breakdown().by_op
    # Per token 2*E*3E + 2*E*E + 2*2*E*F, per sequence 4*S*S*E (E=32, F=64, S=10, B=2).
    # FlopCounterMode cannot be the reference: it misses CPU SDPA (pytorch #195460).
    assert fast == _count(counter, lambda: enc(x)) == 20 * 16384 + 2 * 4 * 100 * 32


def test_transformer_encoder_nested_fast_path_counts_real_tokens(counter: FlopsCounter) -> None:
    """With a padding mask the encoder runs on a nested tensor: only unpadded tokens count."""
    layer = _encoder()
    stack = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    with torch.no_grad(), pytest.warns(UserWarning, match="nested"):
        nested = _count(counter, lambda: stack(x, src_key_padding_mask=mask))
    per_sequence = _count(counter, lambda: (layer(x[:1]), layer(x[1:, :6])))
    assert nested == per_sequence


def test_native_multi_head_attention_fast_path(counter: FlopsCounter) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x, y = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    for q, kv in ((x, x), (x, y)):
        with torch.no_grad():
            fast = _count(counter, lambda q=q, kv=kv: mha(q, kv, kv))
        # The fast path is taken for self-attention only (torch/nn/modules/activation.py).
        assert ("aten._native_multi_head_attention" in counter.breakdown().by_op) == (q is kv)
        # Grad mode takes the unfused path (bmm attention with need_weights=True).
        assert fast == _count(counter, lambda q=q, kv=kv: mha(q, kv, kv))
        assert fast == _upstream(lambda q=q, kv=kv: mha(q, kv, kv))


def test_cpu_lstm_kernel_counts_like_lstm_cells(counter: FlopsCounter) -> None:
    """nn.LSTM on CPU is one mkldnn_rnn_layer call; LSTMCell steps are addmm (counted upstream)."""
    torch.manual_seed(0)
    lstm, cell = nn.LSTM(8, 16, batch_first=True), nn.LSTMCell(8, 16)
    x = torch.randn(2, 5, 8)

    def cells() -> None:
        state = None
        for t in range(5):
            state = cell(x[:, t], state)

    forward = _count(counter, lambda: lstm(x))
    assert "aten.mkldnn_rnn_layer" in counter.breakdown().by_op
    assert forward == _upstream(cells) == 2 * 10 * (64 * 8 + 64 * 16)
    assert _count(counter, lambda: lstm(x)[0].sum().backward()) == 3 * forward


def test_every_fused_formula_names_an_operator_of_this_build() -> None:
    """A typo in the table would silently never match; only optional libraries may be absent."""
    optional = ("fbgemm", "_mps", "miopen", "cudnn", "quantized.", "onednn.", "_nnpack")
    for name in FUSED_FORMULAS:
        namespace, op = name.split(".", 1)
        packet = getattr(getattr(torch.ops, namespace), op, None)
        assert packet is not None or any(tag in name for tag in optional), name


@pytest.mark.slow
def test_inductor_freezing_counts_like_eager(counter: FlopsCounter) -> None:
    """CPU Inductor with freezing=True: Linear becomes mkl._mkl_linear; totals equal eager."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Conv1d(8, 8, 3))
    model.eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        eager = _count(counter, lambda: model(x))
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(model)
            compiled(x)
            frozen = _count(counter, lambda: compiled(x))
    assert frozen == eager == 571904
    torch._dynamo.reset()
