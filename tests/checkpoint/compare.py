"""Exact comparison helpers shared by the checkpoint tests."""

from __future__ import annotations

import io
import math
import zipfile
from typing import Any

import torch

SERIALIZATION_ID = ".data/serialization_id"


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A contiguous tensor of ``shape`` whose bytes are random (any bit pattern but bool)."""
    n = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool().reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def raw_bytes(storage: torch.UntypedStorage) -> bytes:
    """Every byte of a CPU storage (fast; ``bytes(storage)`` goes element by element)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()


def storage_bytes(t: torch.Tensor) -> bytes:
    """Every byte of ``t``'s storage (what torch.save writes for it)."""
    return raw_bytes(t.untyped_storage())


def assert_tensor_identical(actual: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    """Same class, dtype, device, geometry and bit-identical storage."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{where}: device {actual.device} != {expected.device}"
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    assert actual.stride() == expected.stride(), f"{where}: stride {actual.stride()} != {expected.stride()}"
    assert actual.storage_offset() == expected.storage_offset(), f"{where}: storage offset differs"
    assert actual.requires_grad == expected.requires_grad, f"{where}: requires_grad differs"
    if expected.device.type == "meta":
        return
    assert actual.untyped_storage().nbytes() == expected.untyped_storage().nbytes(), (
        f"{where}: storage size differs"
    )
    assert storage_bytes(actual) == storage_bytes(expected), f"{where}: storage bytes differ"


def assert_identical(actual: Any, expected: Any, where: str = "obj") -> None:
    """Recursive exact equality: containers by type and order, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: got {type(actual)}"
        assert_tensor_identical(actual, expected, where)
    elif isinstance(expected, torch.nn.Module):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual.training == expected.training, f"{where}: training flag differs"
        assert_identical(actual.state_dict(keep_vars=True), expected.state_dict(keep_vars=True), where)
    elif isinstance(expected, dict):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_identical(actual[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{where}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{i}]")
    else:
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def load(data: bytes | str, *, weights_only: bool = True) -> Any:
    """torch.load from bytes or a path."""
    if isinstance(data, bytes):
        return torch.load(io.BytesIO(data), weights_only=weights_only)
    return torch.load(data, weights_only=weights_only)


def zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    """The archive's records in order, with their bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def assert_same_archive(actual: bytes, expected: bytes) -> None:
    """Same records in the same order at the same offsets, same bytes but the serialization id."""
    a, e = zip_members(actual), zip_members(expected)
    assert [i.filename for i, _ in a] == [i.filename for i, _ in e]
    assert len(actual) == len(expected)
    for (ai, ab), (ei, eb) in zip(a, e):
        assert (ai.header_offset, ai.file_size, ai.compress_type) == (
            ei.header_offset,
            ei.file_size,
            ei.compress_type,
        ), ai.filename
        if ai.filename.endswith(SERIALIZATION_ID):
            continue
        assert ab == eb, f"record {ai.filename} differs"
