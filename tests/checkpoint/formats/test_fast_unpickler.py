"""The restricted C unpickler in front of torch's weights-only one (formats/torch_save/fast_unpickler.py).

It must return exactly what torch.load(weights_only=True) returns, take the
fast path for plain state dicts, hand everything else to torch's unpickler
(which then decides), and never run a global outside its allow-list.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import torchaux
from torchaux.checkpoint.formats.torch_save import fast_unpickler


def _plain_state() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),  # OrderedDict with _metadata (BUILD)
        "optim": opt.state_dict(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "blob": b"\x00\xffbytes",  # protocol 2: _codecs.encode
        "dtype": torch.bfloat16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
        "view": torch.arange(10.0)[2:7:2], "half": torch.ones(3, dtype=torch.float16),
        "empty": torch.empty(0), "step": 7, "nested": [1.5, None, (True, "s")],
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and a.requires_grad == b.requires_grad
                and torch.equal(a, b))
    if isinstance(a, dict):
        return (type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
                and getattr(a, "_metadata", None) == getattr(b, "_metadata", None))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.fixture
def no_torch_unpickler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch's weights-only unpickler fail: only the fast path can load."""
    from torch import _weights_only_unpickler

    class Refuse:
        def __init__(self, *_a: Any, **_k: Any) -> None:
            raise AssertionError("torch's weights-only unpickler was used")

    monkeypatch.setattr(_weights_only_unpickler, "Unpickler", Refuse)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_plain_state_dict_takes_the_fast_path_and_equals_torch_load(
    tmp_path: Path, mmap: bool, no_torch_unpickler: None
) -> None:
    path = tmp_path / "s.pt"
    state = _plain_state()
    torch.save(state, path)
    expected = torch.load(path, weights_only=False)  # the unrestricted reference
    got = torchaux.load(path, mmap=mmap)
    assert _same(got, expected)
    assert got["param"].requires_grad and type(got["param"]) is torch.nn.Parameter


@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu")])
def test_cpu_loads_build_storages_straight_from_the_records(
    tmp_path: Path, map_location: Any, no_torch_unpickler: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU load skips torch's _load (and its rebuild): shared storages, views, bits as torch's."""
    import torch.serialization

    def no_load(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("torch.serialization._load was used")

    path = tmp_path / "s.pt"
    base = torch.arange(12.0)
    z = torch.tensor([1 + 2j, 3 - 1j])
    state = {**_plain_state(), "base": base, "tail": base[3:], "grid": base.view(3, 4).t(),
             "conj": z.conj(), "neg": torch.tensor([2 - 1j]).conj().imag, "bf16": torch.ones(2, 3, dtype=torch.bfloat16).t()}
    torch.save(state, path)
    expected = torch.load(path, weights_only=False, map_location=map_location)
    monkeypatch.setattr(torch.serialization, "_load", no_load)
    got = torchaux.load(path, map_location=map_location)
    assert _same(got, expected)
    assert got["conj"].is_conj() == expected["conj"].is_conj()
    assert got["neg"].is_neg() == expected["neg"].is_neg()
    assert torch.equal(got["conj"].resolve_conj(), expected["conj"].resolve_conj())
    assert got["tail"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
    assert got["tail"].storage_offset() == 3 and got["grid"].stride() == (1, 4)
    assert got["base"]._backward_hooks == expected["base"]._backward_hooks


def test_fake_mode_skip_data_and_meta_loads_take_torchs_path(tmp_path: Path) -> None:
    """Outside the CPU fast path (fake tensors, skip_data, meta) the result is torch's."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    path = tmp_path / "s.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    with FakeTensorMode():
        fake = torchaux.load(path)["w"]
    assert isinstance(fake, FakeTensor) and fake.shape == (4,)
    with torch.serialization.skip_data():
        skipped = torchaux.load(path)["w"]
    assert skipped.shape == (4,) and skipped.dtype == torch.float32
    meta = torchaux.load(path, map_location="meta")["w"]
    assert meta.is_meta and meta.shape == (4,)


def test_the_control_without_the_fast_path_fails(
    tmp_path: Path, no_torch_unpickler: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture really disables torch's path: with the fast path off, the load fails."""
    path = tmp_path / "s.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(fast_unpickler.Unpickler, "find_class",
                        lambda self, m, n: (_ for _ in ()).throw(fast_unpickler.NotPlain(m)))
    with pytest.raises(AssertionError, match="weights-only unpickler was used"):
        torchaux.load(path)


def test_what_the_fast_path_declines_torch_weights_only_still_loads(tmp_path: Path) -> None:
    """A set (builtins.set) is outside the fast path but inside weights-only: same result."""
    path = tmp_path / "s.pt"
    state = {"s": {1, 2}, "c": complex(1, 2), "w": torch.ones(2)}
    torch.save(state, path)
    assert _same(torchaux.load(path), torch.load(path, weights_only=True))


def _evil_pickle(sentinel: Path) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {sentinel}",))

    return pickle.dumps({"w": Evil()}, protocol=2)


def test_a_hostile_global_never_runs_on_either_path(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    blob = _evil_pickle(sentinel)
    with pytest.raises(fast_unpickler.NotPlain, match="system"):
        fast_unpickler.Unpickler(io.BytesIO(blob)).load()
    # Inside a torch.save archive: torch's unpickler refuses it too.
    path = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buf)
    import zipfile

    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, blob if info.filename.endswith("data.pkl") else data)
    with pytest.raises(pickle.UnpicklingError):
        torchaux.load(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("args", [
    ("offset", "x"),
    ("hooks", collections.OrderedDict(h=collections.OrderedDict)),
    ("metadata", {"k": collections.OrderedDict}),
])
def test_rebuild_arguments_torch_save_never_writes_are_declined(args: tuple[str, Any]) -> None:
    storage = torch.ones(2).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    kw: dict[str, Any] = {"offset": 0, "hooks": collections.OrderedDict(), "metadata": None}
    kw[args[0]] = args[1]
    with pytest.raises(fast_unpickler.NotPlain):
        fast_unpickler._tensor_v2(typed, kw["offset"], (2,), (1,), False, kw["hooks"], kw["metadata"])
    with pytest.raises(fast_unpickler.NotPlain):
        fast_unpickler._encode("x", "zlib_codec")


def test_tensors_with_hooks_set_by_build_are_declined() -> None:
    t = torch.ones(1)
    t._backward_hooks = collections.OrderedDict(a=print)
    with pytest.raises(fast_unpickler.NotPlain, match="backward hooks"):
        fast_unpickler.check_result({"x": [t]})
    assert fast_unpickler.check_result({"x": [torch.ones(1)]})["x"][0].item() == 1.0
