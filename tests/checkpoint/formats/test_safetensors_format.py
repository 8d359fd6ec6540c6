"""The safetensors writer matches safetensors' bytes; the reader is strict and total."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from torchaux.checkpoint.engine import staging
from torchaux.checkpoint.formats.safetensors import writer as sf
from torchaux.checkpoint.formats.safetensors.writer import (
    SAFETENSORS_DTYPES,
    check_safetensors_dtypes,
    check_safetensors_metadata,
    raw_bytes,
    read_safetensors,
    safetensors_crc,
    sniff_safetensors,
    verify_crc,
    write_safetensors,
)
from torchaux.errors import IntegrityError, UnsupportedFormatError

st = pytest.importorskip("safetensors")
st_torch = pytest.importorskip("safetensors.torch")

_SHAPES = [(), (0,), (5,), (2, 3), (3, 0, 2)]
# dtypes safetensors.torch.load can turn back into torch tensors (0.8 lacks F4 and F8_E8M0).
_ST_LOADABLE = [d for d in SAFETENSORS_DTYPES if d not in (torch.float4_e2m1fn_x2, torch.float8_e8m0fnu)]


def _rand(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (bools kept 0/1)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw %= 2
    return raw.view(dtype).view(shape)


def _snap(tensors: dict[str, torch.Tensor]) -> staging.Snapshot:
    snap = staging.stage(
        tensors, pool=staging.HostBufferPool(), pickle_module=pickle, pickle_protocol=2,
        index=tensors,
    )  # fmt: skip
    snap.finish_staging()
    return snap


def _ours(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
          crc: bool = False) -> bytes:  # fmt: skip
    buf = io.BytesIO()
    write_safetensors(_snap(tensors), buf, list(tensors), metadata, crc=crc)
    return buf.getvalue()


def _header(blob: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n])  # type: ignore[no-any-return]


def _blob(header: str | dict[str, Any], data: bytes = b"", *, pad: bool = True) -> bytes:
    raw = header if isinstance(header, str) else json.dumps(header)
    out = raw.encode("utf-8", "surrogatepass")
    if pad:
        out += b" " * (-len(out) % 8)
    return struct.pack("<Q", len(out)) + out + data


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(raw_bytes(a)) == bytes(raw_bytes(b))


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- byte identity with safetensors.torch.save --------------------------------


@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(SAFETENSORS_DTYPES), ids=str)
def test_bytes_equal_safetensors_save(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """For every supported dtype and shape (0-d, zero-size too) the file equals safetensors'."""
    if dtype == torch.float4_e2m1fn_x2 and shape == ():
        pytest.skip("0-d F4 is rejected by both writers")
    t = {"t": _rand(dtype, shape)}
    assert _ours(t) == st_torch.save(t)


def test_mixed_dtypes_ordered_like_safetensors() -> None:
    """Every dtype in one file, two names each: data order (rank, then name) matches safetensors."""
    tensors = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        tensors[f"z{i:02d}"] = _rand(dtype, (3,), seed=i)
        tensors[f"a{i:02d}"] = _rand(dtype, (2, 2), seed=100 + i)
    assert _ours(tensors, {"format": "pt"}) == st_torch.save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}], ids=["none", "empty", "one"])
def test_metadata_bytes_equal(metadata: dict[str, str] | None) -> None:
    """No metadata, empty metadata and one key are written exactly as safetensors writes them."""
    t = {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.int64)}
    assert _ours(t, metadata) == st_torch.save(t, metadata=metadata)


def test_many_metadata_keys_equal_up_to_key_order() -> None:
    """With several keys only the key order differs (safetensors' order is random); ours is sorted."""
    meta = {k: f"v{k}" for k in ["b", "a", "B", "é", "_", "zz"]}
    t = {"w": torch.randn(4)}
    ours, theirs = _ours(t, meta), st_torch.save(t, metadata=meta)
    assert len(ours) == len(theirs) and ours[:8] == theirs[:8]
    assert _header(ours) == _header(theirs)
    assert list(_header(ours)["__metadata__"]) == sorted(meta)
    n = 8 + struct.unpack_from("<Q", ours)[0]
    assert ours[n:] == theirs[n:]


def test_escaped_names_and_metadata_bytes_equal() -> None:
    """Quotes, backslashes, control characters, DEL and non-ASCII are escaped like serde_json."""
    names = ['q"uote', "back\\slash", "nl\n\t\r\b\f", "ctl\x01\x1f", "del\x7f", "é ü 漢 🎉", "\u2028/"]
    tensors = {n: torch.full((2,), float(i)) for i, n in enumerate(names)}
    meta = {"k\x00\"\\": "v\u2028\x7f\n🎉"}
    assert _ours(tensors, meta) == st_torch.save(tensors, metadata=meta)


def test_non_contiguous_written_as_contiguous_bytes() -> None:
    """Transposed, strided, offset and expanded views are written as their C-order bytes."""
    base = torch.randn(6, 8)
    views = {
        "t": base.t(),
        "step": base[:, ::3],
        "offset": base[2:4],
        "expand": torch.arange(3.0).expand(4, 3),
        "bf16_t": base.to(torch.bfloat16).t(),
        "f4_t": _rand(torch.uint8, (4, 6)).view(torch.float4_e2m1fn_x2).t(),
    }
    assert _ours(views) == st_torch.save({k: v.contiguous() for k, v in views.items()})


def test_shared_storage_written_independently() -> None:
    """Tensors sharing a storage (tied weights, overlapping slices) each get their own bytes."""
    base = torch.arange(10.0)
    tensors = {"a": base[:6], "b": base[4:], "tied": base, "tied2": base}
    assert _ours(tensors) == st_torch.save({k: v.clone() for k, v in tensors.items()})


def test_small_write_chunks_give_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing tensors in many small chunks changes no byte of the output."""
    t = {"w": torch.randn(100), "i": torch.arange(7)}
    monkeypatch.setattr(sf, "_CHUNK", 3)
    assert _ours(t) == st_torch.save(t)


def test_f4_shape_counts_elements() -> None:
    """float4_e2m1fn_x2 [2, 3] is stored as F4 [2, 6] and reads back as the same tensor."""
    t = _rand(torch.float4_e2m1fn_x2, (2, 3))
    blob = _ours({"f": t})
    assert _header(blob)["f"]["shape"] == [2, 6]
    assert _same(read_safetensors(blob)[0]["f"], t)


# -- interoperability ----------------------------------------------------------


def test_safetensors_load_reads_ours() -> None:
    """safetensors.torch.load returns our tensors unchanged, for every dtype it can load."""
    tensors = {f"t{i}": _rand(d, s, seed=i) for i, (d, s) in
               enumerate((d, s) for d in _ST_LOADABLE for s in _SHAPES)}  # fmt: skip
    loaded = st_torch.load(_ours(tensors))
    assert set(loaded) == set(tensors)
    assert all(_same(loaded[k], tensors[k]) for k in tensors)


def test_safe_open_reads_our_file_and_metadata(tmp_path: Path) -> None:
    """safe_open on a file we wrote sees our tensors and our metadata, crc_num included."""
    tensors = {"w": torch.randn(3, 4), "s": torch.tensor(5), "e": torch.zeros(0, 2)}
    path = tmp_path / "m.safetensors"
    path.write_bytes(_ours(tensors, {"format": "pt"}, crc=True))
    with st.safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert all(_same(f.get_tensor(k), tensors[k]) for k in tensors)
        meta = f.metadata()
    assert meta == {"format": "pt", "crc_num": str(safetensors_crc(tensors))}


@pytest.mark.parametrize("dtype", list(SAFETENSORS_DTYPES), ids=str)
def test_reader_reads_safetensors_output(dtype: torch.dtype) -> None:
    """Our reader returns safetensors' tensors exactly, for every dtype and shape."""
    shapes = [s for s in _SHAPES if s or dtype != torch.float4_e2m1fn_x2]
    tensors = {f"t{i}": _rand(dtype, s, seed=i) for i, s in enumerate(shapes)}
    loaded, meta = read_safetensors(st_torch.save(tensors, metadata={"k": "v"}))
    assert meta == {"k": "v"} and list(loaded) == sorted(tensors)
    assert all(_same(loaded[k], tensors[k]) for k in tensors)


def test_scalar_and_zero_size_round_trip() -> None:
    """A 0-d tensor comes back with shape [] and zero-size tensors keep their shape."""
    tensors = {"s": torch.tensor(2.5), "e": torch.zeros(0, 3, dtype=torch.int32), "n": torch.zeros(0)}
    blob = _ours(tensors)
    assert _header(blob)["s"]["shape"] == []
    loaded, meta = read_safetensors(blob)
    assert meta == {} and all(_same(loaded[k], tensors[k]) for k in tensors)


def test_reader_accepts_file_objects(tmp_path: Path) -> None:
    """Real files, streams at an offset and non-seekable streams read the same tensors."""
    tensors = {"w": torch.randn(5), "i": torch.arange(3)}
    blob = _ours(tensors)
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)

    class _Stream(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            return self._inner.readinto(b)

    at_offset = io.BytesIO(b"junk" + blob)
    at_offset.seek(4)
    with open(path, "rb") as f:
        results = [read_safetensors(f)[0], read_safetensors(at_offset)[0],
                   read_safetensors(_Stream(blob))[0], read_safetensors(memoryview(blob))[0]]  # fmt: skip
    assert all(set(r) == set(tensors) and all(_same(r[k], tensors[k]) for k in r) for r in results)


def test_reader_rejects_text_and_non_files() -> None:
    """A text stream or a non-file argument is a TypeError, not a corrupt file."""
    with pytest.raises(TypeError, match="binary"):
        read_safetensors(io.StringIO("{}"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes or a binary file"):
        read_safetensors(12)  # type: ignore[arg-type]


def test_names_filter_predicate_and_collection() -> None:
    """names_filter selects by predicate or by names; an absent name is a KeyError."""
    blob = _ours({"a.w": torch.ones(1), "a.b": torch.zeros(1), "c": torch.ones(2)})
    assert list(read_safetensors(blob, names_filter=lambda n: n.startswith("a."))[0]) == ["a.b", "a.w"]
    assert list(read_safetensors(blob, names_filter=["c"])[0]) == ["c"]
    with pytest.raises(KeyError, match="nope"):
        read_safetensors(blob, names_filter={"c", "nope"})


def test_names_filter_still_validates_whole_file() -> None:
    """A corrupt entry that is not selected still fails the read."""
    header = {"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [2], 1, 2)}
    with pytest.raises(IntegrityError, match="'b'"):
        read_safetensors(_blob(header, b"\x01\x02"), names_filter=["a"])


# -- CRC ---------------------------------------------------------------------------


def test_crc_equals_independent_computation() -> None:
    """crc_num is zlib CRC-32 chained over sorted names and C-order bytes (MindSpore §4.2)."""
    tensors = {"b": torch.randn(3, 2).t(), "a": torch.arange(4, dtype=torch.int16),
               "é": torch.tensor(True), "h": torch.randn(2).to(torch.bfloat16)}  # fmt: skip
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    blob = _ours(tensors, {"format": "ms"}, crc=True)
    loaded, meta = read_safetensors(blob)
    assert meta == {"format": "ms", "crc_num": str(crc)}
    assert verify_crc(loaded, meta) is True


def test_verify_crc_detects_changed_data_and_missing_value() -> None:
    """A changed tensor byte fails the CRC; files without crc_num give None."""
    tensors = {"w": torch.arange(8, dtype=torch.uint8)}
    blob = bytearray(_ours(tensors, crc=True))
    blob[-1] ^= 1
    loaded, meta = read_safetensors(bytes(blob))
    assert verify_crc(loaded, meta) is False
    assert verify_crc(*read_safetensors(_ours(tensors))) is None


@pytest.mark.parametrize("value", ["", "-1", "abc", "4294967296", "１２"])
def test_verify_crc_rejects_malformed_value(value: str) -> None:
    """A crc_num that is not a decimal 32-bit value is an IntegrityError."""
    with pytest.raises(IntegrityError, match="crc_num"):
        verify_crc({"w": torch.ones(1)}, {"crc_num": value})


def test_crc_without_metadata_creates_metadata() -> None:
    """crc=True with metadata=None writes a metadata object holding only crc_num."""
    tensors = {"w": torch.ones(2)}
    assert _header(_ours(tensors, crc=True))["__metadata__"] == {"crc_num": str(safetensors_crc(tensors))}


# -- writer validation (before any I/O) -------------------------------------------


@pytest.mark.filterwarnings("ignore:.*(quantized|ComplexHalf).*:UserWarning")
@pytest.mark.parametrize(
    "make",
    [lambda: torch.zeros(2, dtype=torch.complex128),
     lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
     lambda: torch.zeros(2, dtype=torch.complex32),
     lambda: torch.zeros(2, dtype=torch.uint8).view(torch.bits8)],
    ids=["complex128", "qint8", "complex32", "bits8"],
)  # fmt: skip
def test_check_rejects_unsupported_dtypes(make: Any) -> None:
    """Dtypes safetensors has no name for raise ValueError naming the tensor and the dtype."""
    tensor = make()
    with pytest.raises(ValueError, match=f"'x' of dtype {tensor.dtype}"):
        check_safetensors_dtypes({"x": tensor})


@pytest.mark.parametrize(
    ("tensors", "error", "match"),
    [
        ({"__metadata__": torch.ones(1)}, ValueError, "reserves"),
        ({1: torch.ones(1)}, TypeError, "names must be str"),
        ({"x": [1.0]}, TypeError, "expected torch.Tensor"),
        ({"x": torch.ones(2).to_sparse()}, ValueError, "to_dense"),
        ({"x": torch.ones(2, dtype=torch.complex64).conj()}, ValueError, "resolve_conj"),
        ({"x": torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, ValueError, "0-d"),
        ({"\ud800": torch.ones(1)}, ValueError, "not valid Unicode"),
    ],
    ids=["reserved", "non-str-name", "non-tensor", "sparse", "conj", "f4-0d", "surrogate"],
)
def test_check_rejects_bad_tensors(tensors: Any, error: type[Exception], match: str) -> None:
    """Names, value types, layouts and view bits safetensors cannot hold are refused clearly."""
    with pytest.raises(error, match=match):
        check_safetensors_dtypes(tensors)


@pytest.mark.parametrize(
    ("metadata", "crc", "error", "match"),
    [
        ({"epoch": 3}, False, TypeError, "use str"),
        ({3: "x"}, False, TypeError, "keys must be str"),
        (["a"], False, TypeError, "dict of str"),
        ({"crc_num": "1"}, True, ValueError, "reserved"),
        ({"k": "\udc80"}, False, ValueError, "not valid Unicode"),
    ],
    ids=["int-value", "int-key", "list", "crc-clash", "surrogate"],
)
def test_check_rejects_bad_metadata(metadata: Any, crc: bool, error: type[Exception], match: str) -> None:
    """Metadata must map str to str, and crc_num is reserved when crc=True."""
    with pytest.raises(error, match=match):
        check_safetensors_metadata(metadata, crc=crc)
    check_safetensors_metadata({"crc_num": "1"}, crc=False)


@pytest.mark.parametrize(
    ("names", "metadata", "error"),
    [(["w", "c"], None, ValueError), (["w", "w"], None, ValueError), (["w", "nope"], None, KeyError),
     (["w"], {"a": 1}, TypeError), ("w", None, TypeError)],
    ids=["dtype", "duplicate", "unindexed", "metadata", "names-str"],
)  # fmt: skip
def test_writer_fails_before_writing(names: Any, metadata: Any, error: type[Exception]) -> None:
    """Every writer error is raised before the first byte reaches the file."""
    snap = _snap({"w": torch.ones(2), "c": torch.zeros(2, dtype=torch.complex128)})
    buf = io.BytesIO()
    with pytest.raises(error):
        write_safetensors(snap, buf, names, metadata)
    assert buf.getvalue() == b""


def test_writer_refuses_oversized_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header over the readers' limit is refused before writing, not written unreadable."""
    monkeypatch.setattr(sf, "MAX_HEADER_BYTES", 64)
    buf = io.BytesIO()
    with pytest.raises(ValueError, match="over the 64-byte"):
        write_safetensors(_snap({"w": torch.ones(1)}), buf, ["w"], {"k": "v" * 64})
    assert buf.getvalue() == b""


# -- reader: corruption ----------------------------------------------------------

_SMALL = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "s": torch.tensor(3, dtype=torch.int16),
          "e": torch.zeros(0, dtype=torch.uint8)}  # fmt: skip


def test_truncation_at_every_position_is_integrity_error() -> None:
    """Cutting a small file at any byte, including to nothing, raises IntegrityError."""
    blob = _ours(_SMALL, {"k": "v"})
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            read_safetensors(blob[:cut])


def test_flipped_header_byte_is_integrity_error() -> None:
    """Inverting any byte of the length field or the JSON header raises IntegrityError."""
    blob = _ours(_SMALL, {"k": "v"})
    end = 8 + struct.unpack_from("<Q", blob)[0]
    for pos in range(end):
        bad = bytearray(blob)
        bad[pos] ^= 0xFF
        with pytest.raises(IntegrityError):
            read_safetensors(bytes(bad))


_U8 = _entry("U8", [2], 0, 2)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "at least 8 bytes"),
        (b"\x02\x00\x00\x00", "at least 8 bytes"),
        (struct.pack("<Q", 100_000_001) + b"{}", "exceeds"),
        (struct.pack("<Q", 2**64 - 1) + b"{}      ", "exceeds"),
        (struct.pack("<Q", 16) + b"{}      ", "runs past the end"),
        (_blob('{"a": 1', pad=False), "not valid JSON"),
        (_blob("{'a': 1}"), "not valid JSON"),
        (_blob('{"a": {}} x'), "not valid JSON"),
        (_blob(" {}"), "start with '{'"),
        (_blob("[]"), "start with '{'"),
        (struct.pack("<Q", 8) + b'{"\xff"}   ', "UTF-8"),
        (_blob('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"), "not valid JSON"),
        (_blob('{"a": %s, "a": %s}' % (json.dumps(_U8), json.dumps(_U8)), b"\0\0"), "twice"),
        (_blob({"a": _entry("X99", [2], 0, 2)}, b"\0\0"), "unknown dtype"),
        (_blob({"a": _entry("F32", [2], 0, 4)}, b"\0" * 4), "needs 8 bytes"),
        (_blob({"a": _entry("F4", [3], 0, 1)}, b"\0"), "not whole bytes"),
        (_blob({"a": _U8, "b": _entry("U8", [2], 1, 3)}, b"\0" * 3), "overlapping"),
        (_blob({"a": _U8, "b": _entry("U8", [2], 3, 5)}, b"\0" * 5), "belong to no tensor"),
        (_blob({"a": _entry("U8", [2], 1, 3)}, b"\0" * 3), "belong to no tensor"),
        (_blob({"a": _U8}, b"\0" * 3), "1 more bytes"),
        (_blob({"a": _U8}, b"\0"), "truncated"),
        (_blob({"a": _U8, "z": _entry("U8", [0], 1, 1)}, b"\0\0"), "overlapping"),
        (_blob({"a": {"dtype": "U8", "shape": [2]}}, b"\0\0"), "missing \\['data_offsets'\\]"),
        (_blob({"a": {**_U8, "extra": 1}}, b"\0\0"), "unexpected \\['extra'\\]"),
        (_blob({"a": _entry("U8", [True, 2], 0, 2)}, b"\0\0"), "shape must be"),
        (_blob({"a": _entry("U8", [2.0], 0, 2)}, b"\0\0"), "shape must be"),
        (_blob({"a": _entry("U8", [-2], 0, 2)}, b"\0\0"), "shape must be"),
        (_blob({"a": _entry("U8", [0, 2**63], 0, 0)}), "shape must be"),
        (_blob({"a": _entry("U8", [2**40] * 3, 0, 0)}), "overflows"),
        (_blob({"a": {**_U8, "data_offsets": [2, 0]}}, b"\0\0"), "data_offsets must be"),
        (_blob({"a": {**_U8, "data_offsets": [0, 2, 4]}}, b"\0\0"), "data_offsets must be"),
        (_blob({"a": {**_U8, "data_offsets": [-2, 0]}}, b"\0\0"), "data_offsets must be"),
        (_blob({"a": [1, 2]}, b"\0\0"), "expected an object"),
        (_blob({"__metadata__": {"k": 1}}), "must be a string"),
        (_blob({"__metadata__": ["k"]}), "object of strings"),
        (_blob('{"\\ud800": %s}' % json.dumps(_U8), b"\0\0"), "not valid Unicode"),
    ],
    ids=lambda v: None if isinstance(v, bytes) else v[:24],
)
def test_corruption_is_integrity_error(blob: bytes, match: str) -> None:
    """Each kind of malformed file raises IntegrityError saying what was expected and found."""
    with pytest.raises(IntegrityError, match=match):
        read_safetensors(blob)


def test_valid_edge_files_are_accepted() -> None:
    """Empty files, null metadata and several zero-size tensors at one offset are valid."""
    assert read_safetensors(_blob({})) == ({}, {})
    assert read_safetensors(_blob({"__metadata__": None})) == ({}, {})
    tensors, _ = read_safetensors(_blob({"a": _entry("U8", [0], 0, 0), "b": _entry("U8", [0, 4], 0, 0)}))
    assert [t.shape for t in tensors.values()] == [(0,), (0, 4)]


@pytest.mark.parametrize(
    ("entry", "match"),
    [(_entry("F6_E2M3", [4], 0, 3), "no torch equivalent"), (_entry("F4", [2, 3], 0, 3), "even last")],
    ids=["f6", "f4-odd"],
)  # fmt: skip
def test_valid_but_unloadable_dtypes(entry: dict[str, Any], match: str) -> None:
    """Valid safetensors that torch cannot hold raise UnsupportedFormatError, not IntegrityError."""
    with pytest.raises(UnsupportedFormatError, match=match):
        read_safetensors(_blob({"a": entry}, b"\0" * 3))


# -- fuzz ------------------------------------------------------------------------------

_FUZZ = {
    "w": torch.randn(3, 4, generator=torch.Generator().manual_seed(1)),
    "idx": torch.arange(5),
    "h": torch.randn(2, 2).to(torch.bfloat16),
    "mask": torch.tensor([True, False, True]),
    "s": torch.tensor(7, dtype=torch.uint8),
    "e": torch.zeros(0, 3, dtype=torch.float16),
}
_JSON_BYTES = b'{}[]":,0123456789 -eE.tnulfa\\'


def _mutate(blob: bytes, rng: random.Random, data_start: int) -> tuple[bytes, bool]:
    """One random mutation; the flag says whether only tensor bytes changed (same length)."""
    b = bytearray(blob)
    kind = rng.randrange(8)
    pos = rng.randrange(len(b))
    if kind == 7:
        pos = rng.randrange(data_start, len(b))
        b[pos] ^= rng.randrange(1, 256)
    elif kind == 0:
        b[pos] ^= rng.randrange(1, 256)
    elif kind == 1:
        b[pos] = rng.choice(_JSON_BYTES)
        return bytes(b), pos >= data_start
    elif kind == 2:
        return bytes(b[:pos]), False
    elif kind == 3:
        del b[pos : pos + rng.randrange(1, 16)]
        return bytes(b), False
    elif kind == 4:
        b[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        return bytes(b), False
    elif kind == 5:
        b[0:8] = struct.pack("<Q", max(0, data_start - 8 + rng.randrange(-16, 17)))
        return bytes(b), False
    else:
        b[pos:pos] = b[pos : pos + rng.randrange(1, 32)]
        return bytes(b), False
    return bytes(b), pos >= data_start


def test_fuzzed_files_raise_only_integrity_error() -> None:
    """Random mutations never crash the reader; accepted files read as safetensors reads them."""
    blob = _ours(_FUZZ, {"format": "pt"})
    data_start = 8 + struct.unpack_from("<Q", blob)[0]
    rng = random.Random(20240607)
    accepted = data_only = 0
    for _ in range(400):
        bad, only_data = _mutate(blob, rng, data_start)
        try:
            ours = read_safetensors(bad)[0]
        except IntegrityError:
            assert not only_data, "a mutation of tensor bytes only must still read"
            ours = None
        try:
            theirs = {name: v for name, v in st.deserialize(bad)}
        except st.SafetensorError:
            assert ours is None, "we accepted a file safetensors rejects"
            continue
        if ours is None:
            continue
        accepted += 1
        data_only += only_data
        assert set(ours) == set(theirs)
        for name, t in ours.items():
            assert SAFETENSORS_DTYPES[t.dtype] == theirs[name]["dtype"]
            assert list(t.shape) == theirs[name]["shape"]
            assert bytes(raw_bytes(t)) == bytes(theirs[name]["data"])
    assert data_only > 40 and accepted >= data_only


# -- sniffing --------------------------------------------------------------------------


def test_sniff_recognises_safetensors_only() -> None:
    """Our files and safetensors' are sniffed as safetensors; zips, pickles and JSON are not."""
    torch_zip, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.ones(1)}, torch_zip)
    torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    assert sniff_safetensors(_ours({"w": torch.ones(1)})[:9])
    assert sniff_safetensors(st_torch.save({})[:16])
    for other in [torch_zip.getvalue(), legacy.getvalue(), b'{"a": 1, "b": 2}', b"", b"\x08" + b"\0" * 7]:
        assert not sniff_safetensors(other[:64])


# -- metadata is data, not structure (security review, issue #16 item 6) ------

import warnings  # noqa: E402

import torchaux  # noqa: E402
from torchaux.checkpoint.formats.safetensors.metadata import (  # noqa: E402
    APPEND_METADATA_KEY,
    HEADER_CRC_KEY,
    header_crc,
    safetensors_entries,
)


def _st_file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (json.dumps({"a": 1}), "has the name of a tensor"),
        (json.dumps({"evil": {"n": 1}}), "'evil' is a dict"),
        (json.dumps({"lst": [1, {"x": None}]}), "'lst' is a list"),
        (json.dumps({"none": None}), "'none' is a NoneType"),
        ('"abc"', "must be a JSON object .* found a str"),
        ("[1, 2]", "must be a JSON object .* found a list"),
        ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
        ("{not json", "not valid JSON"),
        ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ],
    ids=["shadow", "dict", "list", "null", "str", "array", "huge-int", "garbage", "deep"],
)
def test_values_metadata_can_only_add_scalars(tmp_path: Path, values: str, message: str) -> None:
    """t_st.py: torchaux.values never replaces a tensor or injects lists/dicts; damage is IntegrityError."""
    path = _st_file(
        tmp_path / "v.safetensors",
        {"__metadata__": {APPEND_METADATA_KEY: values}, "a": _entry("F32", [1], 0, 4)},
        bytes(4),
    )
    with pytest.raises(IntegrityError, match=message):
        torchaux.load_checkpoint(path)


def test_values_metadata_keeps_scalar_types() -> None:
    values = json.dumps({"i": 3, "f": 0.5, "b": True, "s": "x", "nan": float("nan")})
    out = safetensors_entries({"w": torch.ones(1)}, {APPEND_METADATA_KEY: values}, "f")
    assert [type(out[k]) for k in ("i", "f", "b", "s", "nan")] == [int, float, bool, str, float]


def _crc_file(tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    path = tmp_path / "c.safetensors"
    torchaux.save_checkpoint(
        {"w": torch.ones(2)}, path, format="safetensors", crc_check=True, append_dict={"e": 1}
    )
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_stripped_header_crc_is_an_integrity_error(tmp_path: Path) -> None:
    """t_hdr.py: removing torchaux.header_crc32 no longer disables it (dtype F32 -> I32)."""
    header, data = _crc_file(tmp_path)
    del header["__metadata__"][HEADER_CRC_KEY]
    header["w"]["dtype"] = "I32"
    path = _st_file(tmp_path / "c2.safetensors", header, data)
    with pytest.raises(IntegrityError, match="header CRC was removed"):
        torchaux.load_checkpoint(path, crc_check=True)
    assert torchaux.load_checkpoint(path)["w"].dtype == torch.int32  # no check asked: no check


def test_changed_dtype_with_header_crc_is_an_integrity_error(tmp_path: Path) -> None:
    header, data = _crc_file(tmp_path)
    header["w"]["dtype"] = "I32"
    path = _st_file(tmp_path / "c3.safetensors", header, data)
    with pytest.raises(IntegrityError, match="header CRC does not match"):
        torchaux.load_checkpoint(path, crc_check=True)


def test_mindspore_file_without_header_crc_warns(tmp_path: Path) -> None:
    """MindSpore writes crc_num only ("format": "ms"): loaded, with a warning naming the gap."""
    t = {"w": torch.ones(2)}
    meta = {"format": "ms", "crc_num": str(sf.safetensors_crc(t))}
    path = _st_file(tmp_path / "ms.safetensors", {"__metadata__": meta, "w": _entry("F32", [2], 0, 8)},
                    sf.raw_bytes(t["w"]).tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = torchaux.load_checkpoint(path, crc_check=True)
    assert torch.equal(loaded["w"], t["w"])
    assert any("not covered by a CRC" in str(w.message) for w in caught)
    assert header_crc(t, {"format": "pt"}) == "0a683a29"
