"""The C unpickler, restricted to plain state dicts, for loads at memcpy speed.

``torch.load(weights_only=True)`` runs ``data.pkl`` through
``torch._weights_only_unpickler``, a pickle machine written in Python: ~25 ms
for a state dict of 130 tensors here, which is most of a warm ``mmap=True``
load of 256 MiB (docs/benchmarks.md §9; ``safetensors.load_file`` has no
pickle).  This module is the fast path in front of it: CPython's C
``pickle.Unpickler`` with ``find_class`` restricted to an allow-list far
smaller than weights-only's (the "Restricting Globals" recipe of the
``pickle`` documentation), for what ``torch.save`` writes for a state dict:

* ``torch._utils._rebuild_tensor_v2`` and ``_rebuild_parameter``, wrapped to
  accept only the argument types ``torch.save`` writes (a storage from the
  archive, ints, int tuples, a bool, *empty* backward hooks, plain
  metadata);
* ``collections.OrderedDict``, ``torch.Size``, ``torch.device``, dtypes;
* ``_codecs.encode`` with latin-1 only (protocol 2's encoding of ``bytes``).

Storage types never reach ``find_class`` (torch's ``UnpicklerWrapper``
resolves them).  The C unpickler calls only what ``find_class`` returns, so
nothing outside this list can run.  Anything else - another global, an
argument of another type - raises :class:`NotPlain`, and the caller runs the
same bytes through torch's weights-only unpickler, which decides with its
full rules (its own allow-list, ``torch.serialization.add_safe_globals``).
The fast path therefore accepts a subset of what weights-only accepts, and
returns the same objects.

>>> import io, pickle
>>> Unpickler(io.BytesIO(pickle.dumps(collections.OrderedDict(a=1), protocol=2))).load()
OrderedDict([('a', 1)])
>>> Unpickler(io.BytesIO(pickle.dumps(print))).load()
Traceback (most recent call last):
...
torchaux.checkpoint.formats.torch_save.fast_unpickler.NotPlain: builtins.print is outside the fast path
"""

from __future__ import annotations

import collections
import pickle
from typing import Any

import torch
from torch._utils import _rebuild_parameter, _rebuild_tensor_v2

__all__ = ["NotPlain", "Unpickler"]


class NotPlain(pickle.UnpicklingError):
    """The pickle needs more than the fast path allows: use torch's weights-only unpickler."""


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _plain_metadata(value: Any) -> bool:
    # torch.save writes tensor metadata as a dict of str -> bool (e.g. conj/neg bits).
    return value is None or (
        type(value) is dict and all(type(k) is str and type(v) is bool for k, v in value.items())
    )


def _no_hooks(hooks: Any) -> bool:
    return type(hooks) in (dict, collections.OrderedDict) and not hooks


def _tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
               backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    if not (
        isinstance(storage, torch.storage.TypedStorage) and type(offset) is int and _ints(size)
        and _ints(stride) and type(requires_grad) is bool and _no_hooks(backward_hooks)
        and _plain_metadata(metadata)
    ):
        raise NotPlain("_rebuild_tensor_v2 with arguments torch.save does not write")
    return _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata)


def _parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.nn.Parameter:
    if not (type(data) is torch.Tensor and type(requires_grad) is bool and _no_hooks(backward_hooks)):
        raise NotPlain("_rebuild_parameter with arguments torch.save does not write")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1"); no other codec runs.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise NotPlain("_codecs.encode with a codec other than latin-1")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _encode,
}


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` (the C one) that resolves only the fast path's globals."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise NotPlain(f"{module}.{name} is outside the fast path")


def check_result(obj: Any) -> Any:
    """Refuse (:class:`NotPlain`) tensors whose state BUILD changed: hooks set after rebuild.

    BUILD on a tensor (``Tensor.__setstate__``) can set ``_backward_hooks``
    to allow-listed callables; torch.save never writes that for a state dict.
    """
    stack = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if item._backward_hooks:
                raise NotPlain("a tensor with backward hooks")
        elif isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item.keys())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return obj
