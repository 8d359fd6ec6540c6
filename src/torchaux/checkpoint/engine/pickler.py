"""Pickling an object exactly as ``torch.save`` does, collecting its storages.

The pickle is the ``data.pkl`` record of a torch.save file; the storages are
what :mod:`~torchaux.checkpoint.engine.staging` copies into host buffers.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.serialization import location_tag, normalize_storage_type

from torchaux.checkpoint.engine.versions import trackable

__all__ = ["TensorLocation", "FlatStorages", "pickle_storages", "flat_storages", "index_tensors",
           "copy_order"]


class TensorLocation(NamedTuple):
    """Where a named tensor's elements live inside a staged storage.

    A named tuple, not a frozen dataclass: one is made per tensor on the
    training thread at every save, and a frozen dataclass's ``__init__``
    (``object.__setattr__`` per field) costs several times more.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int



# Types the pickler meets most that are never tensors or storages (exact types:
# a subclass goes the long way).
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, tuple, list, dict,
                    collections.OrderedDict, torch.Size, torch.dtype, torch.device,
                    types.FunctionType, types.BuiltinFunctionType, type})


def _reduce_ordered_dict(od: collections.OrderedDict) -> tuple[Any, ...]:
    # What OrderedDict.__reduce__ returns (CPython Objects/odictobject.c,
    # odict_reduce), without its call to copyreg._slotnames: that cannot cache
    # its answer on a built-in type and costs ~8 us per call; every tensor
    # pickles one (its empty backward-hooks OrderedDict), 0.8 s of 3.3 s for
    # 10^5 small tensors (engine review k_many.py).  The bytes are the same
    # (tests/checkpoint/engine/test_pickler.py).
    return (collections.OrderedDict, (), getattr(od, "__dict__", None) or None, None, iter(od.items()))


def _dispatch_table() -> dict[type, Any]:
    # A reduction the user registered for OrderedDict wins, as in torch.save.
    return {collections.OrderedDict: _reduce_ordered_dict, **copyreg.dispatch_table}


def pickle_storages(
    obj: object, pickle_module: Any, protocol: int, tensors: list[torch.Tensor] | None = None
) -> tuple[bytes, dict[str, torch.UntypedStorage]]:
    """Pickle ``obj`` with torch.save's storage records; return payload and storages.

    The ``persistent_id`` records follow torch/serialization.py ``_save``
    (torch 2.13): ``("storage", storage_type, key, location, numel)``, keys
    numbered by first appearance, one entry per distinct storage; a fake
    tensor's storage (``skip_data(materialize_fake_tensors=True)``) is
    located at its fake device.  Every tensor pickled is appended to
    ``tensors`` when given (for the version check).
    """
    storages: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}
    dtypes: dict[int, torch.dtype] = {}
    skip = torch.serialization._serialization_tls.skip_data

    def persistent_id(o: object) -> tuple[Any, ...] | None:
        # The pickler asks about every object (1.9 million calls for a state of
        # 10^5 small tensors: engine review k_many.py); the common plain types
        # answer at once.
        if type(o) in _PLAIN:
            return None
        if isinstance(o, torch.Tensor):
            if tensors is not None:
                tensors.append(o)
            return None
        if isinstance(o, torch.storage.TypedStorage):
            storage, dtype = o._untyped_storage, o.dtype
            storage_type = getattr(torch, o._pickle_storage_type())
            numel = o._size()
        elif torch.is_storage(o):
            storage, dtype = o, torch.uint8  # type: ignore[assignment]
            storage_type = normalize_storage_type(type(o))
            numel = storage.nbytes()
        else:
            return None
        if storage.device.type == "meta":
            if not skip:
                raise ValueError(
                    "save_async got a tensor on the 'meta' device, which has no data to save; "
                    "materialise it (e.g. module.to_empty(device='cpu')) or leave it out"
                )
        elif storage.data_ptr() != 0:
            # torch.load cannot rebuild one memory region as two dtypes; reject as torch.save does.
            if dtypes.setdefault(storage.data_ptr(), dtype) != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as "
                    "different types"
                )
        key = keys.setdefault(storage._cdata, str(len(keys)))
        storages[key] = storage
        fake_device = getattr(o, "_fake_device", None)
        location = str(fake_device) if fake_device is not None else location_tag(storage)
        return ("storage", storage_type, key, location, numel)

    buf = io.BytesIO()
    if pickle_module is pickle:
        # The C pickler calls an instance attribute directly: one Python call
        # per object instead of two, and no per-call class (whose reference
        # cycle kept every pickled storage alive until the cyclic GC ran:
        # issue #15.5, f_pool_growth.py).
        pickler = pickle.Pickler(buf, protocol=protocol)
        pickler.persistent_id = persistent_id  # type: ignore[method-assign]
        pickler.dispatch_table = _dispatch_table()
        pickler.dump(obj)  # the pickler is in no cycle: freed with this frame
        return buf.getvalue(), storages

    class _Pickler(pickle_module.Pickler):  # type: ignore[misc, name-defined]
        def persistent_id(self, o: object) -> tuple[Any, ...] | None:
            return persistent_id(o)

    try:
        _Pickler(buf, protocol=protocol).dump(obj)
    finally:
        # A class is always in a reference cycle; through this method it would keep
        # every pickled storage (the caller's live state) alive until the cyclic GC
        # runs - hundreds of MiB per save (issue #15.5, f_pool_growth.py).
        del _Pickler.persistent_id
    return buf.getvalue(), storages


class FlatStorages(NamedTuple):
    """What :func:`flat_storages` finds in a flat list of tensors."""

    storages: dict[str, torch.UntypedStorage]  # key -> storage, first appearance first
    index: dict[str, TensorLocation]  # name -> where the tensor lies in its storage
    tracked: dict[str, list[tuple[torch.Tensor, int]]]  # key -> (tensor, version at the call)


def flat_storages(
    tensors: Sequence[torch.Tensor],
    index: Mapping[str, torch.Tensor] | None = None,
    *,
    track: bool = False,
) -> FlatStorages:
    """The storages of a flat list of tensors, keyed as :func:`pickle_storages` keys them.

    For callers that write each tensor themselves (torchaux.distributed: one
    chunk per tensor; safetensors) and need no ``data.pkl``: no pickling, the
    same first-appearance keys, the same refusals (meta tensors, one storage
    viewed as two dtypes).  ``index`` names tensors of the list (``None``: each
    by its position, ``"0"``, ``"1"``, ...); ``track`` records each trackable
    tensor's version counter (:mod:`.versions`).  One pass over the list: the
    distributed ``save_async`` call runs it on the training thread at every
    save, where three separate passes (storages, index, versions) cost ~170 us
    for 32 tensors (``torchaux bench --distributed``'s state, session 9).

    >>> t = torch.ones(4)
    >>> found = flat_storages([t, t[1:], torch.zeros(2)])
    >>> list(found.storages), found.index["1"].storage_offset
    (['0', '1'], 1)
    """
    storages: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}
    dtypes: dict[int, torch.dtype] = {}
    locations: dict[str, TensorLocation] = {}
    tracked: dict[str, list[tuple[torch.Tensor, int]]] = {}
    key_by_id: dict[int, str] = {}
    skip = torch.serialization._serialization_tls.skip_data
    for i, t in enumerate(tensors):
        storage = t.untyped_storage()
        key = keys.get(storage._cdata)
        if key is None:
            if t.is_meta and not skip:  # (a tensor's flag: storage.device.type costs ~5x more)
                raise ValueError(
                    "save_async got a tensor on the 'meta' device, which has no data to save; "
                    "materialise it (e.g. module.to_empty(device='cpu')) or leave it out"
                )
            key = keys[storage._cdata] = str(len(keys))
            storages[key] = storage
        ptr = storage.data_ptr()
        if ptr != 0 and dtypes.setdefault(ptr, t.dtype) != t.dtype:
            raise RuntimeError(
                "Cannot save multiple tensors or storages that view the same data as different types"
            )
        if index is None:
            locations[str(i)] = TensorLocation(key, t.dtype, tuple(t.shape), tuple(t.stride()),
                                               t.storage_offset())
        if index is not None:
            key_by_id[id(t)] = key
        if track and trackable(t):
            tracked.setdefault(key, []).append((t, t._version))
    for name, t in (index or {}).items():
        key = key_by_id.get(id(t)) or keys.get(t.untyped_storage()._cdata)
        if key is None:
            raise ValueError(f"tensor {name!r} is not part of the object being saved")
        locations[name] = TensorLocation(key, t.dtype, tuple(t.shape), tuple(t.stride()),
                                         t.storage_offset())
    return FlatStorages(storages, locations, tracked)


def index_tensors(
    named: Mapping[str, torch.Tensor], storages: dict[str, torch.UntypedStorage]
) -> dict[str, TensorLocation]:
    key_of = {s._cdata: k for k, s in storages.items()}
    out = {}
    for name, t in named.items():
        key = key_of.get(t.untyped_storage()._cdata)
        if key is None:
            raise ValueError(f"tensor {name!r} is not part of the object being saved")
        out[name] = TensorLocation(
            key, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset()
        )
    return out


def copy_order(
    storages: dict[str, torch.UntypedStorage], priority: Iterable[torch.Tensor]
) -> tuple[list[str], dict[str, None]]:
    """Record keys in copy order: ``priority``'s storages first, in its order, then the rest.

    (A model's tensors come first, in the order forward reaches them.)  Also
    returns the set of prioritised keys.
    """
    key_of = {s._cdata: k for k, s in storages.items()}
    first: dict[str, None] = {}
    for t in priority:
        key = key_of.get(t.untyped_storage()._cdata)
        if key is not None:
            first.setdefault(key, None)
    return [*first, *(k for k in storages if k not in first)], first
