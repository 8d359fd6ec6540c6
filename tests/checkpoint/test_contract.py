"""save_async is a drop-in torch.save: same objects back, same file format.

Round-trip tests are parametrised over ``torch.save`` (the reference: it
proves the expectation is right) and ``save_async``; byte-level tests compare
save_async's archive with torch.save's directly.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from compare import (
    assert_identical,
    assert_same_archive,
    load,
    random_tensor,
    zip_members,
)

import torchaux
from torchaux import AsyncSaver

pytestmark = [
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.bool,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]

Save = Callable[..., None]


@pytest.fixture(params=["torch.save", "save_async"])
def save(request: pytest.FixtureRequest, saver: AsyncSaver) -> Save:
    """``save(obj, f, **torch_save_kwargs)`` by the reference or by save_async (waited)."""
    if request.param == "torch.save":
        return torch.save

    def save_async(obj: object, f: Any, **kwargs: Any) -> None:
        handle = torchaux.save_async(obj, f, saver=saver, **kwargs)
        handle.wait(timeout=60)

    return save_async


def roundtrip(save: Save, obj: object, tmp_path: pathlib.Path, *, weights_only: bool = True) -> Any:
    path = tmp_path / "ckpt.pt"
    save(obj, path)
    return load(str(path), weights_only=weights_only)


def dtype_zoo(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    base = random_tensor(dtype, (4, 6), gen)
    return {
        "contiguous": random_tensor(dtype, (3, 5), gen),
        "scalar": random_tensor(dtype, (), gen),
        "empty": torch.empty((0, 3), dtype=dtype),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "offset": base[1:, 2:],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_roundtrips_bitwise(save: Save, dtype: torch.dtype, tmp_path: pathlib.Path) -> None:
    """Tensors of every CPU dtype (0-d, empty, views) load back with the same dtype, geometry and bits."""
    obj = dtype_zoo(dtype)
    assert_identical(roundtrip(save, obj, tmp_path), obj)


def test_shapes_and_views_roundtrip(save: Save, tmp_path: pathlib.Path) -> None:
    """0-d, zero-size, expanded, channels-last and offset views keep shape, stride and offset."""
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    obj = {
        "scalar": torch.tensor(3.5),
        "zero_1d": torch.empty(0),
        "zero_3d": torch.empty(3, 0, 2, dtype=torch.int64),
        "expanded": torch.arange(3.0).expand(4, 3),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(3, 1, 0, 2),
        "narrow": base.flatten()[7:19],
    }
    assert_identical(roundtrip(save, obj, tmp_path), obj)


def test_views_sharing_a_storage_still_share_after_load(save: Save, tmp_path: pathlib.Path) -> None:
    """Two views of one storage load as views of one storage (mutation through one shows in the other)."""
    base = torch.arange(12, dtype=torch.float32)
    obj = {"a": base[2:8].view(2, 3), "b": base.view(3, 4).t()}
    loaded = roundtrip(save, obj, tmp_path)
    assert_identical(loaded, obj)
    a, b = loaded["a"], loaded["b"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a[0, 0] = 100.0  # base[2] == view(3, 4)[0, 2] == b[2, 0]
    assert b[2, 0].item() == 100.0
    members = [i.filename for i, _ in zip_members((tmp_path / "ckpt.pt").read_bytes())]
    assert sum("/data/" in m for m in members) == 1  # one storage record, not two copies


def test_parameter_roundtrips(save: Save, tmp_path: pathlib.Path) -> None:
    """nn.Parameter loads back as nn.Parameter with requires_grad and identical data."""
    obj = {
        "p": torch.nn.Parameter(torch.randn(3, 4)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
    }
    assert_identical(roundtrip(save, obj, tmp_path), obj)


def test_whole_module_roundtrips(save: Save, tmp_path: pathlib.Path) -> None:
    """A pickled nn.Module loads (weights_only=False) with its class, mode, parameters and buffers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    model(torch.randn(8, 5))  # non-trivial running stats
    model.eval()
    loaded = roundtrip(save, model, tmp_path, weights_only=False)
    assert_identical(loaded, model)
    assert [type(m) for m in loaded] == [type(m) for m in model]


def test_adam_state_dict_roundtrips(save: Save, tmp_path: pathlib.Path) -> None:
    """Adam's state_dict after a step (tensors, step counters, hyper-parameters) loads identically."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    obj = opt.state_dict()
    assert obj["state"], "Adam must have state after a step"
    assert_identical(roundtrip(save, obj, tmp_path), obj)


def test_nested_python_containers_roundtrip(save: Save, tmp_path: pathlib.Path) -> None:
    """Nested dict/list/tuple with ints, floats, strs, bools, None and tensors load identically."""
    obj = {
        "step": 17,
        "name": "run-ä",
        "lr": 0.125,
        "flag": True,
        "none": None,
        "list": [1, "two", (3.0, None, [torch.ones(2)])],
        "tuple": (torch.arange(3), {"deep": {"x": torch.zeros(2, 2, dtype=torch.int8)}}),
        7: "int key",
    }
    assert_identical(roundtrip(save, obj, tmp_path), obj)


def test_meta_tensor_roundtrips_like_torch_save(save: Save, tmp_path: pathlib.Path) -> None:
    """A meta tensor (no data) is saved as torch.save saves it: shape and dtype only."""
    obj = {"m": torch.empty(3, 4, device="meta", dtype=torch.float16)}
    assert_identical(roundtrip(save, obj, tmp_path), obj)


def test_pathlib_and_str_targets(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """pathlib.Path and str targets write the file; wait() returns the absolute str path."""
    obj = {"w": torch.arange(5)}
    for target in (tmp_path / "p.pt", str(tmp_path / "s.pt")):
        handle = torchaux.save_async(obj, target, saver=saver)
        assert handle.wait(timeout=60) == str(target)
        assert_identical(load(str(target)), obj)


def test_relative_path_is_resolved_at_call_time(
    saver: AsyncSaver, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path is made absolute when save_async is called (a later chdir does not move the file)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    handle = torchaux.save_async({"x": torch.ones(1)}, "rel.pt", saver=saver)
    monkeypatch.chdir(tmp_path / "b")
    assert handle.wait(timeout=60) == str(tmp_path / "a" / "rel.pt")
    assert os.listdir(tmp_path / "b") == []
    assert_identical(load(str(tmp_path / "a" / "rel.pt")), {"x": torch.ones(1)})


def test_file_object_target(save: Save) -> None:
    """A binary file object (BytesIO) receives a complete, loadable checkpoint."""
    obj = {"w": torch.randn(3, 3), "step": 2}
    buf = io.BytesIO()
    save(obj, buf)
    assert_identical(load(buf.getvalue()), obj)


def test_socket_stream_target(save: Save) -> None:
    """A socket's makefile('wb') (no seek, no tell) receives the same loadable archive as torch.save sends.

    The engine-review reproducer's case 6 reported EOFError here; the fault was in its reader
    thread (bytearray.extend of bytes chunks raises TypeError, so nothing was received), and
    torch.save fails the same way under it. This test reads correctly and fails if either
    writer sends fewer bytes or an archive that does not load.
    """
    import socket
    import threading

    obj = {"w": torch.arange(5.0), "big": torch.randn(64, 1024)}
    sender, receiver = socket.socketpair()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(iter(lambda: receiver.recv(65536), b"")))
    reader.start()
    stream = sender.makefile("wb")
    assert not stream.seekable()
    save(obj, stream)
    stream.close()
    sender.close()
    reader.join(timeout=60)
    receiver.close()
    assert not reader.is_alive()
    assert_identical(load(b"".join(received)), obj)


@functools.cache
def byte_objects() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(10.0)
    return {
        "tensor": torch.randn(4, 5),
        "empty": torch.empty(0),
        "views": {"a": base[1:4], "b": base.view(2, 5).t(), "c": torch.ones(3, dtype=torch.bfloat16)},
        "module": model,
        "optim": opt.state_dict(),
        "nested": {"l": [1, None, "x", (torch.zeros(2, dtype=torch.int64),)]},
    }


BYTE_OBJECT_NAMES = ["tensor", "empty", "views", "module", "optim", "nested"]


def _archives(saver: AsyncSaver, obj: object, **kwargs: Any) -> tuple[bytes, bytes]:
    ref = io.BytesIO()
    torch.save(obj, ref, **kwargs)
    out = io.BytesIO()
    assert torchaux.save_async(obj, out, saver=saver, **kwargs).wait(timeout=60) is None
    return out.getvalue(), ref.getvalue()


@pytest.mark.parametrize("name", BYTE_OBJECT_NAMES)
def test_archive_bytes_match_torch_save(saver: AsyncSaver, name: str) -> None:
    """To a BytesIO, save_async writes torch.save's records byte for byte (except the serialization id)."""
    actual, expected = _archives(saver, byte_objects()[name])
    assert_same_archive(actual, expected)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols_match_torch_save(saver: AsyncSaver, protocol: int) -> None:
    """Each pickle protocol 2..5 is used for data.pkl and gives torch.save's archive."""
    obj = byte_objects()["views"]
    actual, expected = _archives(saver, obj, pickle_protocol=protocol)
    assert_same_archive(actual, expected)
    data_pkl = dict((i.filename, b) for i, b in zip_members(actual))["archive/data.pkl"]
    assert data_pkl[:2] == bytes([0x80, protocol])
    # torch.load's weights_only unpickler does not know protocol 4+ opcodes (FRAME).
    assert_identical(load(actual, weights_only=protocol <= 3), obj)


@pytest.mark.parametrize(
    "disable",
    [
        False,
        True,
    ],
)
def test_byteorder_record_flag_matches_torch_save(saver: AsyncSaver, disable: bool) -> None:
    """_disable_byteorder_record gives the same archive as torch.save with the same flag."""
    obj = {"w": torch.arange(6, dtype=torch.int16)}
    actual, expected = _archives(saver, obj, _disable_byteorder_record=disable)
    assert_identical(load(actual), obj)
    assert_same_archive(actual, expected)


def test_disabled_byteorder_record_is_not_written_before_the_data(saver: AsyncSaver) -> None:
    """With _disable_byteorder_record=True no byteorder record precedes the storages (torch.save's order)."""
    obj = {"w": torch.arange(6, dtype=torch.int16)}
    for data in _archives(saver, obj, _disable_byteorder_record=True):
        names = [i.filename for i, _ in zip_members(data)]
        assert "archive/byteorder" not in names[: names.index("archive/data/0")]
        assert_identical(load(data), obj)


@pytest.mark.parametrize(
    "name",
    [
        "model.pt",
        "model.step10.pt",
        "ckpt",
        ".hidden.pt",
        "a b.pt",
        "mödel.pt",
    ],
)
def test_path_target_matches_torch_save_to_the_same_file_name(
    saver: AsyncSaver, tmp_path: pathlib.Path, name: str
) -> None:
    """A path save equals torch.save(path) for the same file name (archive folder included)."""
    obj = byte_objects()["views"]
    (tmp_path / "ref").mkdir()
    (tmp_path / "out").mkdir()
    ref_path, out_path = tmp_path / "ref" / name, tmp_path / "out" / name
    torch.save(obj, ref_path)
    torchaux.save_async(obj, out_path, saver=saver).wait(timeout=60)
    assert_same_archive(out_path.read_bytes(), ref_path.read_bytes())
    assert_identical(load(str(out_path)), obj)


def test_custom_pickle_module_is_used(saver: AsyncSaver) -> None:
    """pickle_module's Pickler pickles data.pkl, as with torch.save."""
    created: list[object] = []

    class CountingPickler(pickle.Pickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            created.append(self)
            super().__init__(*args, **kwargs)

    class Module:
        Pickler = CountingPickler
        Unpickler = pickle.Unpickler

    obj = {"w": torch.ones(2)}
    actual, expected = _archives(saver, obj, pickle_module=Module)
    assert len(created) == 2  # one by torch.save, one by save_async
    assert_same_archive(actual, expected)
