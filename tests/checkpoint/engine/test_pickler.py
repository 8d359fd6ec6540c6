"""The pickler: torch.save's exact data.pkl, with the fast paths that make many small tensors cheap."""

from __future__ import annotations

import collections
import copyreg
import gc
import io
import pickle
import zipfile
from typing import Any

import pytest
import torch

from torchaux.checkpoint.engine.pickler import pickle_storages
from torchaux.checkpoint.engine.staging import HostBufferPool, stage


class _SubDict(collections.OrderedDict):
    pass


def _torch_save_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def _objects() -> dict[str, Any]:
    torch.manual_seed(0)
    with_attr = collections.OrderedDict(a=torch.ones(2))
    with_attr.note = "kept"  # type: ignore[attr-defined]
    sub = _SubDict(x=torch.zeros(3))
    return {
        "state_dict": torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).state_dict(),
        "empty": collections.OrderedDict(),
        "with-attr": with_attr,
        "subclass": sub,
        "shared": [with_attr, with_attr, sub],
        "tensors": [torch.randn(4) for _ in range(5)],
    }


@pytest.mark.parametrize("name", list(_objects()))
def test_pickle_is_torch_saves(name: str) -> None:
    """data.pkl is byte-identical to torch.save's for OrderedDicts with metadata, attributes, subclasses."""
    obj = _objects()[name]
    pickled, _ = pickle_storages(obj, pickle, 2)
    assert pickled == _torch_save_pickle(obj)


def test_a_user_reduction_for_ordered_dict_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reduction registered with copyreg for OrderedDict is used, as torch.save uses it."""
    monkeypatch.setitem(copyreg.dispatch_table, collections.OrderedDict, lambda od: (dict, (dict(od),)))
    obj = {"o": collections.OrderedDict(a=1)}
    pickled, _ = pickle_storages(obj, pickle, 2)
    assert pickled == _torch_save_pickle(obj)
    assert type(pickle.loads(pickled)["o"]) is dict


def test_tensors_skip_the_slotnames_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tensor's empty hooks OrderedDict no longer calls copyreg._slotnames (~8 us a call, uncacheable)."""
    calls = []
    real = copyreg._slotnames  # type: ignore[attr-defined]
    monkeypatch.setattr(copyreg, "_slotnames", lambda cls: calls.append(cls) or real(cls))
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(1000)}
    pickle_storages(tensors, pickle, 2)
    assert collections.OrderedDict not in calls
    _torch_save_pickle(tensors)  # the control: torch.save's own pickling does call it
    assert collections.OrderedDict in calls


@pytest.mark.parametrize("enabled", [True, False])
def test_staging_restores_the_garbage_collector(enabled: bool) -> None:
    """stage() pauses the cyclic GC and leaves it as it found it, also when staging raises."""
    was = gc.isenabled()
    pool = HostBufferPool()
    try:
        gc.enable() if enabled else gc.disable()
        stage({"w": torch.ones(3)}, pool=pool, pickle_module=pickle, pickle_protocol=2).finish_staging()
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError, match="meta"):
            stage({"m": torch.empty(2, device="meta").untyped_storage()}, pool=pool, pickle_module=pickle, pickle_protocol=2)
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
