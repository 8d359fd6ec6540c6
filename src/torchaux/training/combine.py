"""Tensor combining: move many tensors into one contiguous buffer, on any device.

Fused optimizers and the checkpoint saver both want a parameter set (or its
gradients) to live in *one* flat buffer: one kernel updates every value, and one
copy snapshots them all.  torch_npu offers this as ``npu_combine_tensors`` for
NPU tensors only; this module gives the same three functions for every device
(CPU, CUDA, NPU, ...) and every dtype.

How it works, and how it differs from torch_npu (facts from Ascend/pytorch
``torch_npu/utils/combine_tensors.py`` and ``csrc/aten/common/ChangeDataPtr.cpp``):

* Each input is re-pointed with ``Tensor.set_`` (under ``torch.no_grad``) onto
  the combined buffer's storage.  The tensor object itself stays the same Python
  object: an ``nn.Parameter`` keeps its type, ``requires_grad`` and identity, so
  optimizers and modules that hold it keep working.
* Each input gets a storage of its own size (as on torch_npu: ``nbytes()``,
  ``storage().size()``, ``torch.save``, ``save_async`` and ``save_checkpoint``
  of one parameter see and write only its bytes) that aliases its span of the
  buffer and co-owns the buffer, so nothing can dangle: torch_npu swaps in a
  non-owning pointer, and freeing the combined tensor first leaves the inputs
  pointing at freed memory.  The storage comes from a DLPack round trip
  (:func:`torchaux.training.aliasing.own_storage`); devices without DLPack share the whole buffer's
  storage instead, and :func:`get_storage_size` still reports each span.
* Only the tensors passed in move.  Other aliases of an old storage (a
  ``.detach()`` or ``.data`` taken *before* combining, views of it) keep the old
  memory.  torch_npu moves the storage object, so those aliases follow there.
  Combine the tensors you keep using (the parameters themselves, ``p.grad``).
* Space is reserved per *storage*, as upstream does (``get_storage_size``): a
  tensor that views part of a larger storage brings the whole storage along,
  at the same offset.  Inputs that share one storage share one span (upstream
  counts it twice).  With ``require_copy_value=True`` every byte of the old
  storage is copied (upstream copies only the viewed elements and zero-fills
  the rest).  :func:`get_storage_size` reports each input's own span after
  combining, also through ``.data`` and ``.detach()`` aliases taken afterwards.
* Any dtype is accepted (upstream: fp16/fp32/bf16 only), and the buffer is
  allocated on the inputs' device, type *and* index (upstream allocates on the
  current device).

Writes through ``combined`` do not bump the inputs' autograd version counters
(they are different tensor objects), exactly as upstream: do not modify the
buffer between a forward pass and its backward pass.  Combining itself between
a forward and its backward works (the values do not change, so the version
counters are restored), as with upstream's pointer swap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from torchaux.training.aliasing import own_storage
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "combine_tensors",
    "npu_combine_tensors",
    "get_part_combined_tensor",
    "is_combined_tensor_valid",
    "get_storage_size",
]


# Without DLPack the inputs share the whole buffer's storage, so each one's span
# (first element, size) is remembered, keyed by tensor identity with the storage's
# (pointer, bytes) so a later re-pointing is noticed (weak keys: Tensor.__eq__ is
# elementwise, so a plain WeakKeyDictionary cannot hold tensors).
_SPANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def get_storage_size(tensor: torch.Tensor) -> int:
    """Return the number of elements of ``tensor``'s storage span.

    This is the unit :func:`combine_tensors` reserves per input and the unit
    of ``index``/``size`` in :func:`get_part_combined_tensor` (torch_npu's
    ``get_storage_size``).  It is not ``numel()``: a view of a larger storage
    reports the whole storage.  A tensor moved by :func:`combine_tensors` (or
    returned by :func:`get_part_combined_tensor`) keeps reporting the span it
    occupies in the buffer, as on torch_npu, not the whole buffer.

    Args:
        tensor: a strided tensor on any device.

    Example:
        >>> import torch
        >>> view = torch.arange(10.0)[2:5]
        >>> get_storage_size(view)
        10
        >>> flat = combine_tensors([torch.zeros(3), view])
        >>> get_storage_size(view), get_storage_size(flat)
        (10, 13)
    """
    return _span(tensor)[1]


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """``(first element, size)`` of the part of its storage that ``tensor`` owns.

    The whole storage, unless ``tensor`` got a span of a combined buffer from
    this module and still points there.
    """
    storage = tensor.untyped_storage()
    remembered = _SPANS.get(tensor)
    if remembered is not None and remembered[0] == (storage.data_ptr(), storage.nbytes()):
        return int(remembered[1]), int(remembered[2])
    return 0, storage.nbytes() // tensor.element_size()


def _elements_from_start(tensor: torch.Tensor) -> int:
    """Elements from ``tensor``'s first element to the end of its span."""
    first, size = _span(tensor)
    return first + size - tensor.storage_offset()


def _check_inputs(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Validate everything before any tensor moves, so a failure changes nothing."""
    checked: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        if t is None:
            raise RuntimeError(
                f"combine_tensors: tensors to combine must not contain None, but entry {i} "
                "is None; drop it (e.g. skip parameters whose .grad is None)."
            )
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"combine_tensors: expected a list of torch.Tensor, entry {i} is "
                f"{type(t).__name__}; pass tensors only."
            )
        first = checked[0] if checked else t
        if t.dtype != first.dtype:
            raise RuntimeError(
                f"combine_tensors: tensors to combine must have the same dtype; entry 0 is "
                f"{first.dtype}, entry {i} is {t.dtype}. Combine each dtype separately."
            )
        # torch.device equality compares type and index, so cuda:0 != cuda:1.
        if t.device != first.device:
            raise RuntimeError(
                f"combine_tensors: tensors to combine must be on one device; entry 0 is on "
                f"{first.device}, entry {i} on {t.device}. Combine each device separately."
            )
        if t.layout != torch.strided:
            raise RuntimeError(
                f"combine_tensors: entry {i} has layout {t.layout}; only dense (strided) "
                "tensors can be combined. Convert it with .to_dense() first."
            )
        if not t.is_contiguous():
            raise RuntimeError(
                f"combine_tensors: tensors to combine must be contiguous; entry {i} with shape "
                f"{tuple(t.shape)} has strides {t.stride()}. Replace it by t.contiguous() "
                "first and keep using the returned tensor."
            )
        if t.grad_fn is not None:
            # Re-pointing an autograd intermediate would desynchronise it from the
            # copies autograd saved for backward; fused optimizers only ever
            # combine leaves (parameters, gradients, optimizer state).
            raise RuntimeError(
                f"combine_tensors: entry {i} is the output of an autograd operation "
                f"(grad_fn={type(t.grad_fn).__name__}); combine leaf tensors only "
                "(parameters, .grad, optimizer state) or pass t.detach()."
            )
        if t.numel() > _elements_from_start(t) or t.storage_offset() < _span(t)[0]:
            raise RuntimeError(
                f"combine_tensors: entry {i} has {t.numel()} elements but only "
                f"{_elements_from_start(t)} remain in its storage (was the storage "
                "resized?); pass a tensor whose storage holds all of its elements."
            )
        checked.append(t)
    return checked


def combine_tensors(
    list_of_tensor: Sequence[torch.Tensor | None], require_copy_value: bool = True
) -> torch.Tensor | None:
    """Move ``list_of_tensor`` into one new contiguous 1-D buffer and return it.

    Afterwards every input reads and writes its own span of the returned
    buffer: a write through either side is seen by the other.  Input ``k``'s
    storage starts where input ``k-1``'s storage ends (sizes by
    :func:`get_storage_size`), so parts can be taken back with
    :func:`get_part_combined_tensor`.  Safe to call with or without grad mode;
    parameters keep training normally (see the module docstring).

    Args:
        list_of_tensor: tensors of one dtype and one device, contiguous, not
            autograd intermediates.  Inputs sharing a storage share one span.
        require_copy_value: copy the current values into the buffer; ``False``
            only re-points, and the inputs then read zeros.

    Returns:
        The combined buffer, or ``None`` for an empty list or when every
        storage is empty.

    Raises:
        RuntimeError: an entry is ``None``, dtypes or devices differ, or an
            entry is non-contiguous, not strided or has a ``grad_fn``.  Nothing
            has moved when this is raised.
        TypeError: an entry is not a tensor.

    Example:
        >>> import torch
        >>> a, b = torch.ones(2), torch.full((2, 2), 3.0)
        >>> flat = combine_tensors([a, b])
        >>> flat
        tensor([1., 1., 3., 3., 3., 3.])
        >>> flat.mul_(2)[:2]
        tensor([2., 2.])
        >>> a
        tensor([2., 2.])
        >>> flat.data_ptr() == a.data_ptr()
        True
    """
    tensors = _check_inputs(list(list_of_tensor))
    if not tensors:
        return None

    # One span of the buffer per distinct source span (a whole storage, or the
    # span an earlier combine gave), in order of first appearance.  A storage
    # without bytes (or on the meta device) has data_ptr 0 and never aliases.
    # Offsets are read now: set_ below changes them, and an input may repeat.
    placed: dict[tuple[int, int], int] = {}
    copies: list[tuple[torch.UntypedStorage, int, int, int]] = []
    targets: list[tuple[torch.Tensor, int, int, int]] = []
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        first, size = _span(t)
        key = (storage.data_ptr(), first)
        if key[0] == 0 or key not in placed:
            placed[key] = total
            copies.append((storage, first, size, total))
            total += size
        targets.append((t, placed[key], t.storage_offset() - first, size))
    if total == 0:
        return None

    dtype, device = tensors[0].dtype, tensors[0].device
    esize = tensors[0].element_size()
    combined = torch.zeros(total, dtype=dtype, device=device)
    raw = combined.view(torch.uint8)
    spans: dict[tuple[int, int], torch.UntypedStorage | None] = {}
    with torch.no_grad():
        for old, first, size, start in copies:
            if require_copy_value:
                # Raw bytes, span by span: keeps every element of each storage (not
                # only the viewed ones) and works for every dtype.
                source = torch.empty(0, dtype=torch.uint8, device=device).set_(old)
                dst = raw[start * esize : (start + size) * esize]
                dst.copy_(source[first * esize : (first + size) * esize])
            spans[start, size] = own_storage(raw, start * esize, size * esize)
        # set_ bumps the version counter shared with views autograd saved (linear
        # saves weight.t()); the values are unchanged, so restore it (not when
        # they become zeros) and a backward pending across the combine still works.
        versions = tuple(t._version for t, *_ in targets)
        for t, start, offset, size in targets:
            own = spans[start, size]
            if own is None:  # no DLPack for this device: share the whole buffer
                whole = combined.untyped_storage()
                t.set_(whole, start + offset, t.size(), t.stride())
                _SPANS[t] = ((whole.data_ptr(), whole.nbytes()), start, size)
            else:
                t.set_(own, offset, t.size(), t.stride())
                _SPANS.pop(t, None)
        if require_copy_value:
            torch._C._autograd._unsafe_set_version_counter(
                tuple(t for t, *_ in targets), versions
            )
    return combined


#: torch_npu's name for :func:`combine_tensors` (``torch_npu.utils.npu_combine_tensors``).
npu_combine_tensors = combine_tensors


def get_part_combined_tensor(
    combined_tensor: torch.Tensor | None, index: int, size: int
) -> torch.Tensor | None:
    """Return a 1-D tensor aliasing ``size`` elements of ``combined_tensor`` from ``index``.

    The result shares (and co-owns) the buffer's memory but is not an autograd
    view of it; as on torch_npu, its storage holds exactly ``size`` elements
    and its ``storage_offset()`` is 0.

    Args:
        combined_tensor: a buffer returned by :func:`combine_tensors`, or ``None``.
        index: first element, counted from ``combined_tensor``'s start.
        size: number of elements.

    Returns:
        The aliasing tensor, or ``None`` when ``combined_tensor`` is ``None``
        or ``size`` is 0.

    Raises:
        RuntimeError: ``index`` or ``size`` is negative, or ``index + size``
            exceeds the buffer.
        TypeError: ``index`` or ``size`` is not an int.

    Example:
        >>> import torch
        >>> a, b = torch.zeros(2), torch.ones(3)
        >>> flat = combine_tensors([a, b])
        >>> part = get_part_combined_tensor(flat, get_storage_size(a), get_storage_size(b))
        >>> part.fill_(7.0)
        tensor([7., 7., 7.])
        >>> b
        tensor([7., 7., 7.])
    """
    if combined_tensor is None:
        return None
    for name, value in (("index", index), ("size", size)):
        if not isinstance(value, int):
            raise TypeError(
                f"get_part_combined_tensor: {name} must be an int element count, "
                f"got {type(value).__name__}; pass e.g. get_storage_size(t)."
            )
    if size == 0:
        return None
    if index < 0 or size < 0:
        raise RuntimeError(
            f"get_part_combined_tensor: index and size must be >= 0, got index={index}, "
            f"size={size}; count elements from the start of the combined tensor."
        )
    available = _elements_from_start(combined_tensor)
    if index + size > available:
        # Leading text kept from torch_npu so code matching its message still does.
        raise RuntimeError(
            f"(index + size) ({index + size}) > get_storage_size(combined_tensor) "
            f"({available}); the part must lie inside the combined tensor, so pass a "
            "smaller index or size."
        )
    storage = combined_tensor.untyped_storage()
    part = torch.empty(0, dtype=combined_tensor.dtype, device=combined_tensor.device)
    esize = combined_tensor.element_size()
    begin = combined_tensor.storage_offset() + index
    raw = torch.empty(0, dtype=torch.uint8, device=combined_tensor.device).set_(storage)
    own = own_storage(raw, begin * esize, size * esize)
    if own is None:
        part.set_(storage, begin, (size,))
        _SPANS[part] = ((storage.data_ptr(), storage.nbytes()), part.storage_offset(), size)
    else:  # as on torch_npu: a storage of its own `size` elements, offset 0
        part.set_(own, 0, (size,))
    return part


def is_combined_tensor_valid(
    combined_tensor: torch.Tensor | None, list_of_tensor: Iterable[torch.Tensor | None]
) -> bool:
    """Tell whether every tensor still lives inside ``combined_tensor``'s memory.

    Use it to notice that autograd replaced a combined ``.grad`` (for example
    after ``zero_grad(set_to_none=True)``) or that a parameter was reassigned.
    Stricter than torch_npu, which checks only each tensor's first byte: here
    the whole tensor must lie in the buffer and be on the same device.

    Args:
        combined_tensor: a buffer returned by :func:`combine_tensors`, or ``None``.
        list_of_tensor: the tensors that should live in it.

    Returns:
        ``True`` for an empty list (whatever ``combined_tensor`` is); ``False``
        when ``combined_tensor`` is ``None``, or any entry is ``None``,
        non-contiguous, on another device or outside the buffer.

    Example:
        >>> import torch
        >>> a, b = torch.zeros(2), torch.ones(3)
        >>> flat = combine_tensors([a, b])
        >>> is_combined_tensor_valid(flat, [a, b])
        True
        >>> is_combined_tensor_valid(flat, [a, b.clone()])
        False
    """
    tensors = list(list_of_tensor)
    if not tensors:
        return True
    if combined_tensor is None:
        return False
    storage = combined_tensor.untyped_storage()
    low = storage.data_ptr() + combined_tensor.storage_offset() * combined_tensor.element_size()
    high = low + _elements_from_start(combined_tensor) * combined_tensor.element_size()
    for t in tensors:
        if t is None or not t.is_contiguous() or t.device != combined_tensor.device:
            return False
        # Computed from the storage, not data_ptr(): an empty tensor's data_ptr()
        # is 0 even when it sits inside the buffer.
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        end = start + t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() == 0 or start < low or end > high:
            return False
    return True
