"""Tests for torchaux.training.combine (tensor combining on any device).

The first group mirrors torch_npu's ``test/npu/test_combine_tensors.py`` for
fp16/fp32/bf16; the rest pins our own guarantees (ownership, autograd, errors).
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
from torch import nn

from torchaux.training.combine import (
    combine_tensors,
    get_part_combined_tensor,
    get_storage_size,
    is_combined_tensor_valid,
    npu_combine_tensors,
)

UPSTREAM_DTYPES = [torch.float16, torch.float32, torch.bfloat16]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def _xyz(device: str, dtype: torch.dtype, *, random: bool) -> list[torch.Tensor]:
    make = torch.randn if random else torch.zeros
    return [
        make((2, 2, 2, 2), device=device, dtype=dtype),
        make((4, 4), device=device, dtype=dtype),
        make((3, 3, 3), device=device, dtype=dtype),
    ]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", UPSTREAM_DTYPES)
def test_values_survive_and_parts_read_them(device: str, dtype: torch.dtype) -> None:
    """Combined inputs keep their values, and parts taken at storage offsets see the same."""
    tensors = _xyz(device, dtype, random=True)
    before = [t.clone() for t in tensors]
    combined = npu_combine_tensors(tensors)
    assert combined is not None
    index = 0
    for t, old in zip(tensors, before):
        torch.testing.assert_close(t, old, rtol=0, atol=0)
        part = get_part_combined_tensor(combined, index, get_storage_size(t))
        assert part is not None
        torch.testing.assert_close(part.reshape_as(t), old, rtol=0, atol=0)
        index += get_storage_size(t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", UPSTREAM_DTYPES)
@pytest.mark.parametrize(
    "shapes",
    [
        [(2, 2, 2, 2), (4, 4), (3, 3, 3)],
        # Upstream's "large" shapes (about 59 M elements in all).
        [(200, 20, 200, 20), (4000, 4000), (300, 300, 300)],
    ],
    ids=["small", "large"],
)
def test_storages_are_laid_out_back_to_back(
    device: str, dtype: torch.dtype, shapes: list[tuple[int, ...]]
) -> None:
    """The buffer is contiguous, starts at the first input and each storage follows the last."""
    tensors = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    combined = combine_tensors(tensors)
    assert combined is not None
    assert combined.is_contiguous() and combined.dim() == 1
    assert combined.data_ptr() == tensors[0].data_ptr()
    for prev, nxt in zip(tensors, tensors[1:]):
        assert prev.data_ptr() + get_storage_size(prev) * prev.element_size() == nxt.data_ptr()
    assert get_storage_size(combined) == sum(get_storage_size(t) for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", UPSTREAM_DTYPES)
def test_writes_are_shared_both_ways(device: str, dtype: torch.dtype) -> None:
    """In-place ops on the buffer show in the inputs and ops on the inputs show in the buffer."""
    tensors = _xyz(device, dtype, random=False)
    combined = combine_tensors(tensors)
    assert combined is not None
    combined += 2
    assert [int(t.sum().item()) for t in tensors] == [32, 32, 54]
    for t in tensors:
        t.mul_(2)
    assert int(combined.sum().long().item()) == 236
    assert int(combined.sum().long().item()) == int(sum(t.sum() for t in tensors).long().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", UPSTREAM_DTYPES)
def test_validity_check_matches_upstream(device: str, dtype: torch.dtype) -> None:
    """The inputs are valid; an extra None, clones, or no combined buffer are not; [] is."""
    tensors = _xyz(device, dtype, random=True)
    combined = combine_tensors(tensors)
    assert is_combined_tensor_valid(combined, tensors)
    assert not is_combined_tensor_valid(combined, [*tensors, None])
    assert not is_combined_tensor_valid(combined, [t.clone() for t in tensors])
    assert not is_combined_tensor_valid(None, tensors)
    assert combine_tensors([]) is None
    assert is_combined_tensor_valid(combine_tensors([]), [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", UPSTREAM_DTYPES)
def test_without_copy_inputs_read_zeros_but_still_alias(device: str, dtype: torch.dtype) -> None:
    """require_copy_value=False re-points only: inputs read zeros and still share memory."""
    tensors = _xyz(device, dtype, random=True)
    combined = combine_tensors(tensors, require_copy_value=False)
    assert combined is not None
    assert all(bool((t == 0).all()) for t in tensors)
    combined.fill_(3)
    assert all(bool((t == 3).all()) for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_one_clone_snapshots_every_part(device: str) -> None:
    """combined.clone() equals the parts concatenated and stays fixed when the parts change."""
    tensors = _xyz(device, torch.float32, random=True)
    combined = combine_tensors(tensors)
    assert combined is not None
    snapshot = combined.clone()
    torch.testing.assert_close(snapshot, _flat(tensors), rtol=0, atol=0)
    expected = snapshot.clone()
    for t in tensors:
        t.add_(1)
    torch.testing.assert_close(snapshot, expected, rtol=0, atol=0)
    torch.testing.assert_close(combined, _flat(tensors), rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
)
def test_any_dtype_is_accepted(dtype: torch.dtype) -> None:
    """Dtypes that torch_npu rejects combine here, values and aliasing intact."""
    tensors = [torch.arange(6).reshape(2, 3).to(dtype), torch.ones(4, dtype=dtype)]
    before = [t.clone() for t in tensors]
    combined = combine_tensors(tensors)
    assert combined is not None and combined.dtype == dtype
    for t, old in zip(tensors, before):
        assert torch.equal(t, old)
    combined.zero_()
    assert not any(bool(t.any()) for t in tensors)


def test_empty_inputs_give_none_and_empty_tensors_ride_along() -> None:
    """All-empty storages give None; an empty tensor among others is combined."""
    assert combine_tensors([torch.zeros(0), torch.zeros(0, 3)]) is None
    a, empty, b = torch.ones(2), torch.zeros(0), torch.full((3,), 2.0)
    combined = combine_tensors([a, empty, b])
    assert combined is not None and combined.numel() == 5
    assert is_combined_tensor_valid(combined, [a, empty, b])
    assert empty.shape == (0,) and b.data_ptr() == a.data_ptr() + 2 * a.element_size()


def test_a_view_brings_its_whole_storage_along() -> None:
    """A view of a larger storage reserves the whole storage and keeps its offset and values."""
    base = torch.arange(10.0)
    view = base[4:7]
    other = torch.full((2,), -1.0)
    combined = combine_tensors([other, view])
    assert combined is not None
    assert combined.numel() == 12
    torch.testing.assert_close(combined[2:], torch.arange(10.0))
    torch.testing.assert_close(view, torch.tensor([4.0, 5.0, 6.0]))
    assert view.data_ptr() == combined[6:].data_ptr()
    assert get_storage_size(view) == 10


def test_inputs_sharing_a_storage_share_one_span() -> None:
    """Two views of one storage (or one tensor twice) get one span and stay aliased."""
    base = torch.arange(6.0)
    head, tail = base[:3], base[3:]
    combined = combine_tensors([head, tail, head])
    assert combined is not None and combined.numel() == 6
    torch.testing.assert_close(combined, torch.arange(6.0))
    combined[4] = 40.0
    assert tail[1].item() == 40.0
    assert head.data_ptr() == combined.data_ptr() and tail.data_ptr() == combined[3:].data_ptr()


def test_recombining_moves_tensors_to_a_new_buffer() -> None:
    """Tensors already combined can be combined again, in any order, by their own spans."""
    x, y = torch.ones(2), torch.full((3,), 5.0)
    first = combine_tensors([x, y])
    second = combine_tensors([y, x])
    assert first is not None and second is not None
    torch.testing.assert_close(second, torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0]))
    assert is_combined_tensor_valid(second, [x, y])
    assert not is_combined_tensor_valid(first, [x, y])
    first.fill_(0)
    assert bool((x == 1).all()) and bool((y == 5).all())


def test_inputs_own_the_buffer() -> None:
    """Dropping every other reference to the buffer leaves the inputs valid (nothing dangles)."""
    x, y = torch.full((1000,), 7.0), torch.full((1000,), 9.0)
    combined = combine_tensors([x, y])
    part = get_part_combined_tensor(combined, 1000, 1000)
    del combined
    gc.collect()
    churn = [torch.full((2000,), -1.0) for _ in range(8)]
    assert bool((x == 7).all()) and bool((y == 9).all())
    assert part is not None and bool((part == 9).all()) and len(churn) == 8


def test_aliases_taken_before_combining_keep_old_memory() -> None:
    """Documented difference from torch_npu: a .detach() taken earlier does not follow."""
    x = torch.zeros(3)
    alias = x.detach()
    combine_tensors([x, torch.zeros(2)])
    x.fill_(1.0)
    assert bool((alias == 0).all())
    assert not is_combined_tensor_valid(x, [alias])


def test_fused_linear_parameters_train_like_unfused_ones() -> None:
    """A combined nn.Linear parameter set trains with SGD exactly like an uncombined copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    combined = combine_tensors(params)
    assert combined is not None
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.is_leaf for p in params)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    inputs, target = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(inputs), target).backward()
            o.step()
    for p, ref in zip(model.parameters(), reference.parameters()):
        assert p.grad is not None and ref.grad is not None
        torch.testing.assert_close(p.grad, ref.grad)
        torch.testing.assert_close(p, ref)
    assert is_combined_tensor_valid(combined, params)
    torch.testing.assert_close(combined, _flat(params), rtol=0, atol=0)

    combined.zero_()
    assert all(not bool(p.any()) for p in model.parameters())


def test_combined_gradients_accumulate_in_place_until_set_to_none() -> None:
    """Combined .grad tensors stay in the buffer across backward; set_to_none invalidates them."""
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    combined = combine_tensors(grads)
    assert combined is not None
    model(torch.ones(1, 3)).sum().backward()
    assert is_combined_tensor_valid(combined, [p.grad for p in model.parameters()])
    torch.testing.assert_close(combined, torch.full((8,), 2.0))
    model.zero_grad(set_to_none=True)
    model(torch.ones(1, 3)).sum().backward()
    assert not is_combined_tensor_valid(combined, [p.grad for p in model.parameters()])


@pytest.mark.parametrize(
    ("tensors", "error", "match"),
    [
        ([torch.ones(2), None], RuntimeError, "must not contain None"),
        ([torch.ones(2), torch.ones(2, dtype=torch.float16)], RuntimeError, "same dtype"),
        ([torch.ones(2), torch.ones(2, device="meta")], RuntimeError, "one device"),
        ([torch.ones(2), torch.ones(3, 2).t()], RuntimeError, "must be contiguous"),
        ([torch.ones(2), torch.ones(2).to_sparse()], RuntimeError, "dense"),
        ([torch.ones(2), torch.ones(2, requires_grad=True) * 2], RuntimeError, "leaf"),
        ([torch.ones(2), [1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
    ids=["none", "dtype", "device", "non-contiguous", "sparse", "grad-fn", "not-a-tensor"],
)
def test_bad_inputs_raise_before_anything_moves(
    tensors: list[torch.Tensor], error: type[Exception], match: str
) -> None:
    """Each bad input raises a clear error and leaves the valid inputs where they were."""
    first = tensors[0]
    where = first.data_ptr()
    with pytest.raises(error, match=match):
        combine_tensors(tensors)
    assert first.data_ptr() == where


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.gpu
def test_device_index_is_checked() -> None:
    """cuda:0 and cuda:1 tensors are rejected, not combined into a foreign pointer."""
    with pytest.raises(RuntimeError, match="one device"):
        combine_tensors([torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffer_lands_on_the_inputs_device_index() -> None:
    """The buffer is allocated on the inputs' device, not the current one (upstream bug)."""
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    tensors = [torch.ones(3, device=last), torch.ones(2, device=last)]
    with torch.cuda.device(0):
        combined = combine_tensors(tensors)
    assert combined is not None and combined.device == last


def test_get_part_rejects_out_of_range_and_handles_trivial_cases() -> None:
    """Out-of-range or negative parts raise; None buffer or size 0 give None."""
    combined = combine_tensors([torch.ones(3), torch.ones(2)])
    with pytest.raises(RuntimeError, match=r"\(index \+ size\) \(6\) > get_storage_size"):
        get_part_combined_tensor(combined, 1, 5)
    with pytest.raises(RuntimeError, match=">= 0"):
        get_part_combined_tensor(combined, -1, 2)
    with pytest.raises(RuntimeError, match=">= 0"):
        get_part_combined_tensor(combined, 0, -2)
    with pytest.raises(TypeError, match="int"):
        get_part_combined_tensor(combined, 0.0, 2)  # type: ignore[arg-type]
    assert get_part_combined_tensor(None, 0, 2) is None
    assert get_part_combined_tensor(combined, 0, 0) is None


def test_parts_are_not_autograd_views_and_report_their_own_size() -> None:
    """A part aliases the buffer without an autograd link, and its storage size is its size."""
    combined = combine_tensors([torch.zeros(4), torch.zeros(6)])
    part = get_part_combined_tensor(combined, 4, 6)
    assert part is not None and combined is not None
    assert part._base is None and get_storage_size(part) == 6
    part.fill_(1.0)
    assert combined.sum().item() == 6.0
    inner = get_part_combined_tensor(part, 2, 4)
    assert inner is not None and inner.data_ptr() == combined[6:].data_ptr()
    with pytest.raises(RuntimeError, match="index \\+ size"):
        get_part_combined_tensor(part, 2, 5)


def test_validity_requires_whole_tensor_inside_and_same_device() -> None:
    """A tensor reaching past the buffer, non-contiguous or on another device is invalid."""
    x, y = torch.zeros(4), torch.zeros(6)
    combined = combine_tensors([x, y])
    head = get_part_combined_tensor(combined, 0, 4)
    assert is_combined_tensor_valid(head, [x])
    assert not is_combined_tensor_valid(head, [y])
    assert not is_combined_tensor_valid(combined, [y.view(2, 3).t()])
    assert not is_combined_tensor_valid(combined, [torch.zeros(4, device="meta")])


# -- own storage sizes (review findings c2, c3, c4, c5) ---------------------------------


def _combined_model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    flat = combine_tensors(list(net.parameters()))
    assert flat is not None
    return net, flat


def test_each_combined_tensor_has_a_storage_of_its_own_size() -> None:
    net, flat = _combined_model()
    for p in net.parameters():
        nbytes = p.numel() * p.element_size()
        assert p.untyped_storage().nbytes() == nbytes
        assert p.data.untyped_storage().nbytes() == p.detach().untyped_storage().nbytes() == nbytes
        assert get_storage_size(p.data) == p.numel()
        assert flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * 4
    with pytest.warns(UserWarning, match="TypedStorage"):
        assert [p.storage().size() for p in net.parameters()] == [4096, 64, 640, 10]
    del flat  # the parameters keep the buffer alive
    assert torch.isfinite(net(torch.randn(2, 64))).all()


def test_fused_optimizer_style_reinit_over_combined_params() -> None:
    """torch_npu's fused optimizers size groups by p.storage().size(); twice must work."""
    net, _ = _combined_model()
    params = list(net.parameters())
    for _ in range(2):
        size = sum(get_storage_size(p.data) for p in params)
        flat = combine_tensors(params)
        part = get_part_combined_tensor(flat, 0, size)
        assert part is not None and part.numel() == size == 4810
        assert part.storage_offset() == 0 and part.untyped_storage().nbytes() == size * 4


def test_saving_one_combined_parameter_writes_its_bytes_only(tmp_path: Path) -> None:
    """torch.save, save_async and save_checkpoint of one bias: tens of bytes, not the model."""
    import torchaux

    net, flat = _combined_model()
    bias = net[1].bias
    plain = tmp_path / "plain.pt"
    torch.save({"b": bias.detach().clone()}, plain)
    torch.save({"b": bias}, tmp_path / "save.pt")
    torchaux.save_async({"b": bias}, str(tmp_path / "async.pt")).wait()
    torchaux.save_checkpoint({"b": bias}, str(tmp_path / "ckpt.ckpt"))
    limit = plain.stat().st_size + 200  # same 40 bytes of data, a few records more or less
    for name in ("save.pt", "async.pt", "ckpt.ckpt"):
        assert (tmp_path / name).stat().st_size < limit, name
    assert torch.equal(torch.load(tmp_path / "async.pt")["b"], bias.detach())
    model_bytes = flat.numel() * 4
    torch.save(net.state_dict(), tmp_path / "whole.pt")
    torchaux.save_async(net.state_dict(), str(tmp_path / "whole_async.pt")).wait()
    torchaux.save_checkpoint(net, str(tmp_path / "whole.ckpt"))
    for name in ("whole.pt", "whole_async.pt", "whole.ckpt"):
        size = (tmp_path / name).stat().st_size
        assert model_bytes <= size < model_bytes + 4096, (name, size)  # the buffer once
    loaded = torch.load(tmp_path / "whole.pt")
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())


def test_training_and_device_moves_after_combining() -> None:
    net, flat = _combined_model()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    assert is_combined_tensor_valid(flat, list(net.parameters()))
    moved = copy.deepcopy(net).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in moved.parameters())


def test_combine_between_forward_and_backward() -> None:
    """Upstream swaps pointers, so a pending backward still works; so must ours."""
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(4, 4), torch.randn(2, 4, requires_grad=True)
    ref = copy.deepcopy(lin)
    loss = lin(x).pow(2).sum()
    combine_tensors(list(lin.parameters()))
    loss.backward()
    ref(x).pow(2).sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad)


def test_combined_half_tensor_can_be_viewed_as_float() -> None:
    """Its own storage starts at the tensor: view(dtype) needs no aligned storage offset."""
    a, b = torch.zeros(3, dtype=torch.float16), torch.zeros(8, dtype=torch.float16)
    combine_tensors([a, b])
    assert b.view(torch.float32).shape == (4,)
