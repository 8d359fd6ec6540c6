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
import io
import pickle
import sys
from typing import Any

import torch
from torch._utils import _element_size, _rebuild_parameter, _rebuild_tensor_v2, set_tensor_metadata

__all__ = ["NotPlain", "Unpickler", "load_records"]


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


def _check_rebuild(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                   backward_hooks: Any, metadata: Any) -> None:
    if not (
        isinstance(storage, torch.storage.TypedStorage) and type(offset) is int and _ints(size)
        and _ints(stride) and type(requires_grad) is bool and _no_hooks(backward_hooks)
        and _plain_metadata(metadata)
    ):
        raise NotPlain("_rebuild_tensor_v2 with arguments torch.save does not write")


def _tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
               backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    _check_rebuild(storage, offset, size, stride, requires_grad, backward_hooks, metadata)
    return _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata)


def _lean_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                    backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    # What torch._utils._rebuild_tensor_v2 does for a CPU storage outside any
    # fake mode (load_records checked both), without its three
    # detect_fake_mode calls: ~40 us a tensor here, most of a warm mapped load.
    _check_rebuild(storage, offset, size, stride, requires_grad, backward_hooks, metadata)
    tensor = torch.empty((0,), dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)
    tensor.requires_grad = requires_grad
    if metadata:
        set_tensor_metadata(tensor, metadata)
    tensor._backward_hooks = backward_hooks  # as torch's: an empty OrderedDict
    return tensor


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


class _Kind:
    """A storage type named in the pickle (``torch.FloatStorage``): its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _RecordsUnpickler(Unpickler):
    """The fast path without ``torch.serialization._load``: storages straight from the records."""

    def __init__(self, data: bytes, records: Any, **kwargs: Any) -> None:
        super().__init__(io.BytesIO(data), **kwargs)
        self._records = records
        self._loaded: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and type(name) is str and name.endswith("Storage"):
            if name == "UntypedStorage":
                return _Kind(torch.uint8)
            from torch.serialization import StorageType

            try:
                return _Kind(StorageType(name).dtype)
            except KeyError:
                raise NotPlain(f"torch.{name} is outside the fast path") from None
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _lean_tensor_v2
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        # torch.save writes ("storage", storage type, key, location, numel).
        if type(pid) is not tuple or len(pid) != 5:
            raise NotPlain("a persistent id torch.save does not write")
        typename, kind, key, location, numel = pid
        if not (typename == "storage" and type(kind) is _Kind and type(key) is str
                and location == "cpu" and type(numel) is int and numel >= 0):
            raise NotPlain("a storage outside the fast path (not saved on the CPU)")
        typed = self._loaded.get(key)
        if typed is None:
            nbytes = numel * _element_size(kind.dtype)
            found = self._records.get_storage_from_record(f"data/{key}", nbytes, None)
            typed = torch.storage.TypedStorage(
                wrap_storage=found._untyped_storage, dtype=kind.dtype, _internal=True
            )
            self._loaded[key] = typed
        return typed


def load_records(records: Any, **pickle_load_args: Any) -> Any:
    """Unpickle ``data.pkl`` of loaded zip records onto the CPU, the fast path only.

    Equal to ``torch.serialization._load(records, None, ...)`` for a plain
    state dict saved from CPU tensors on a little-endian host; anything else
    raises :class:`NotPlain` (the caller then takes torch's path).

    Raises:
        NotPlain: outside the fast path (another byte order, a fake-tensor
            mode or ``torch.serialization.skip_data`` active, a storage saved
            on another device, a global outside the allow-list).
    """
    from torch.serialization import _serialization_tls

    byteorder = records.get_record("byteorder") if records.has_record("byteorder") else None
    if byteorder != sys.byteorder.encode() or _serialization_tls.skip_data:
        raise NotPlain("another byte order, or skip_data")
    if torch._guards.detect_fake_mode(None) is not None:
        raise NotPlain("a fake-tensor mode is active")
    unpickler = _RecordsUnpickler(records.get_record("data.pkl"), records, **pickle_load_args)
    return check_result(unpickler.load())


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
