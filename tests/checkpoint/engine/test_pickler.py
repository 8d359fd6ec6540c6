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


def test_flat_storages_keys_storages_as_the_pickler_does() -> None:
    """serialize=False (torchaux.distributed) must stage the same storages under the same keys."""
    from torchaux.checkpoint.engine.pickler import flat_storages, pickle_storages

    a, b = torch.arange(6.0), torch.ones(3, dtype=torch.int64)
    flat = [a, a[2:], b, a.view(2, 3), torch.zeros(0)]
    _, pickled = pickle_storages(flat, pickle, 2)
    got = flat_storages(flat)
    assert list(got.storages) == list(pickled)
    assert all(got.storages[k]._cdata == pickled[k]._cdata for k in got.storages)
    # Positional names, each tensor's place in its storage.
    assert list(got.index) == ["0", "1", "2", "3", "4"]
    assert got.index["1"] == ("0", torch.float32, (4,), (1,), 2)
    assert got.index["3"].shape == (2, 3) and got.index["3"].stride == (3, 1)
    assert got.tracked == {}


def test_flat_storages_names_and_tracks_as_the_separate_passes_did() -> None:
    from torchaux.checkpoint.engine import versions
    from torchaux.checkpoint.engine.pickler import flat_storages, index_tensors

    a, b = torch.arange(6.0), torch.ones(3)
    flat = [a, a[2:], b, torch.ones(2).to_sparse()._values()]
    named = {"w": a, "tail": a[2:], "b": b}
    got = flat_storages(flat, named, track=True)
    assert got.index == index_tensors(named, got.storages)
    expected = versions.track(flat, {s._cdata: k for k, s in got.storages.items()})
    assert {k: [(id(t), v) for t, v in e] for k, e in got.tracked.items()} == {
        k: [(id(t), v) for t, v in e] for k, e in expected.items()}
    with pytest.raises(ValueError, match="not part of the object"):
        flat_storages(flat, {"stray": torch.zeros(1)})


def test_flat_storages_refuses_what_torch_save_refuses() -> None:
    from torchaux.checkpoint.engine.pickler import flat_storages

    a = torch.arange(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="different types"):
        flat_storages([a, a.view(torch.int32)])
    with pytest.raises(ValueError, match="meta"):
        flat_storages([torch.empty(2, device="meta")])


def test_stage_without_serializing_copies_the_same_bytes() -> None:
    from torchaux.checkpoint.engine.pool import HostBufferPool
    from torchaux.checkpoint.engine.staging import stage

    pool = HostBufferPool()
    live = [torch.arange(5.0), torch.full((3,), 7, dtype=torch.int16)]
    snap = stage(live, pool=pool, pickle_module=pickle, pickle_protocol=2, serialize=False,
                 index={"0": live[0], "1": live[1]})
    live[0].add_(1)  # after the call: the snapshot keeps the old values
    snap.finish_staging()
    assert snap.pickled == b""
    assert snap.staged_tensor("0").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert snap.staged_tensor("1").tolist() == [7, 7, 7]
    with pytest.raises(TypeError, match="flat list of tensors"):
        stage({"w": live[0]}, pool=pool, pickle_module=pickle, pickle_protocol=2, serialize=False)
    snap.release(pool)
