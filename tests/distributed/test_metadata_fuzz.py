"""Fuzzing the distributed reader: hostile ``.metadata`` and per-rank files raise torchaux errors only.

Targets: ``.metadata`` (unpickled with an allow-list,
src/torchaux/distributed/metadata.py) and the per-rank data files
(src/torchaux/distributed/reader.py), of torchaux checkpoints (plain and
AES-GCM) and of stock DCP checkpoints.  Inputs: mutations of valid files (bit
flips, extreme integers, insertions, deletions, truncation: the strategy of
tests/checkpoint/test_reader_fuzz.py), hypothesis-generated pickles of plain
objects, and pickles that call allow-listed constructors with arbitrary
arguments or non-allowed callables (``os.system``, ``eval``, ``exec``,
``open``, ``subprocess.Popen``, ...) anywhere in the object graph.

The only exceptions allowed are :class:`~torchaux.errors.CheckpointError`'s
(``IntegrityError``, ``DecryptionError``, ``UnsupportedFormatError``); a pickled
call must never run (each one would create a sentinel file); a case never
hangs (a 30 s alarm, far above any case, turns a hang into a failure rather
than a stuck run).  Damaged torchaux data files must fail their checksum or
load the original values.  The default run is seeded and small;
``TORCHAUX_FUZZ_EXAMPLES`` (the slow run: 10,000) makes it large.

Defects this fuzzer found (non-tensor values of stock files escaping as
torch's own errors, a Metadata with missing fields or chunk entries) are fixed
in reader._load_bytes and metadata/check.py; their tests below stay as
regression tests.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import os
import pathlib
import pickle
import shutil
import signal
import struct
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import planner as dcp_planner

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_reader_fuzz import _mutate, mutation  # noqa: E402 - the single-file fuzzer's strategy

import torchaux.distributed as td  # noqa: E402
from torchaux.distributed.metadata import read_metadata  # noqa: E402
from torchaux.errors import CheckpointError, IntegrityError, UnsupportedFormatError  # noqa: E402

KEY = bytes(range(32))
STATE = {"w": torch.arange(300, dtype=torch.float32), "n": {"i": torch.ones(7, dtype=torch.int64)},
         "step": 7, "name": "run-1"}
#: checkpoint -> (save kwargs, load kwargs); "stock" is written by DCP's own FileSystemWriter.
CHECKPOINTS: dict[str, tuple[dict, dict]] = {
    "torchaux": ({}, {}),
    "torchaux AES-GCM": ({"enc_key": KEY}, {"dec_key": KEY}),
    "stock": ({}, {}),
}


def _examples(default: int) -> int:
    return int(os.environ.get("TORCHAUX_FUZZ_EXAMPLES", default))


def _settings(default: int, *, shrink: bool = True) -> Any:
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=_examples(default), derandomize=True, deadline=None,
                    database=None, suppress_health_check=list(HealthCheck), phases=phases)


class Hang(BaseException):
    """A case ran for 30 s: far beyond any real case (they take milliseconds)."""


@contextlib.contextmanager
def _no_hang(seconds: float = 30.0) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"a fuzz case ran for {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One valid checkpoint directory per kind (never modified: each case works on a copy)."""
    root = tmp_path_factory.mktemp("dist-fuzz-originals")
    out = {}
    for name, (save_kw, _) in CHECKPOINTS.items():
        d = root / name.replace(" ", "_")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if name == "stock":
                dcp.save(STATE, checkpoint_id=str(d))
            else:
                td.save(STATE, d, **save_kw)
        out[name] = d
    return out


def _data_file(d: Path) -> str:
    return next(p.name for p in d.iterdir() if p.name.endswith(".distcp"))


def _same(loaded: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(loaded, dict) and set(loaded) == set(expected) and all(
            _same(loaded[k], v) for k, v in expected.items())
    if isinstance(expected, torch.Tensor):
        return isinstance(loaded, torch.Tensor) and torch.equal(loaded, expected)
    return bool(loaded == expected)


class Case:
    """A writable copy of one checkpoint, reset before each example."""

    def __init__(self, original: Path, work: Path, load_kw: dict) -> None:
        self.original, self.dir, self.load_kw = original, work, load_kw
        shutil.copytree(original, work)

    def write(self, name: str, blob: bytes) -> None:
        for entry in self.original.iterdir():  # every other file back to its valid bytes
            shutil.copyfile(entry, self.dir / entry.name)
        (self.dir / name).write_bytes(blob)

    def load(self) -> dict | None:
        """The loaded state, or None when a documented error was raised (anything else fails)."""
        with _no_hang():
            try:
                return td.load_full(self.dir, **self.load_kw)
            except CheckpointError:
                return None


def _case(originals: dict[str, Path], name: str, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(originals[name], tmp_path_factory.mktemp("dist-fuzz") / "ck", CHECKPOINTS[name][1])


# -- per-rank data files ------------------------------------------------------------


def _fuzz_data_file(case: Case, count: int) -> None:
    name = _data_file(case.original)
    original = (case.original / name).read_bytes()

    @_settings(count)
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(ops: list[tuple]) -> None:
        blob = _mutate(original, ops)
        case.write(name, blob)
        loaded = case.load()
        # Checksummed chunks: a damaged file fails, or the damage missed every chunk.
        assert loaded is None or _same(loaded, STATE), "a damaged data file loaded wrong values"

    run()


@pytest.mark.parametrize("name", ["torchaux", "torchaux AES-GCM"])
def test_damaged_data_files_fail_their_checksum(
    name: str, originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mutated per-rank files of torchaux checkpoints: IntegrityError/DecryptionError or the true values."""
    _fuzz_data_file(_case(originals, name, tmp_path_factory), 150)


def test_damaged_stock_data_files_raise_only_documented_errors(
    originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mutated data files of a stock DCP checkpoint (no checksums): documented errors only."""
    case = _case(originals, "stock", tmp_path_factory)
    name = _data_file(case.original)
    original = (case.original / name).read_bytes()

    @_settings(300, shrink=False)
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(ops: list[tuple]) -> None:
        case.write(name, _mutate(original, ops))
        loaded = case.load()
        assert loaded is None or isinstance(loaded, dict)

    run()


# -- .metadata ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torchaux", "stock"])
def test_damaged_metadata_raises_only_documented_errors(
    name: str, originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mutated ``.metadata``: documented errors, or a load that is well formed."""
    case = _case(originals, name, tmp_path_factory)
    original = (case.original / ".metadata").read_bytes()

    @_settings(300, shrink=False)
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(ops: list[tuple]) -> None:
        case.write(".metadata", _mutate(original, ops))
        loaded = case.load()
        assert loaded is None or isinstance(loaded, dict)

    run()


_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    | st.tuples(inner, inner) | st.frozensets(st.integers(), max_size=3),
    max_leaves=12,
)


def _metadata_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist-fuzz-md")


def test_pickles_of_plain_objects_are_not_metadata(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any pickled plain object (every protocol): IntegrityError (not a Metadata) or, for
    protocols 0-2, which name builtins `__builtin__`, UnsupportedFormatError."""
    d = _metadata_file(tmp_path_factory)

    @_settings(300)
    @given(_plain, st.integers(0, pickle.HIGHEST_PROTOCOL))
    def run(obj: Any, protocol: int) -> None:
        (d / ".metadata").write_bytes(pickle.dumps(obj, protocol=protocol))
        with _no_hang(), pytest.raises((IntegrityError, UnsupportedFormatError)):
            read_metadata(d)

    run()


class Call:
    """Pickles as ``fn(*args)``: a REDUCE of ``fn``'s global, as a hostile file would hold."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)

    def __repr__(self) -> str:
        return f"Call({getattr(self.fn, '__qualname__', self.fn)}, {self.args!r})"


#: Everything on the allow-list that pickles as a global, called with any arguments.
ALLOWED = [
    torch.Size, dcp_md.Metadata, dcp_md.TensorStorageMetadata, dcp_md.BytesStorageMetadata,
    dcp_md.ChunkStorageMetadata, dcp_md.TensorProperties, dcp_md.StorageMeta,
    dcp_md.MetadataIndex, dcp_md._MEM_FORMAT_ENCODING, dcp_fs._StorageInfo,
    dcp_planner.WriteItemType, dcp_planner.LoadItemType, collections.OrderedDict, set,
    frozenset, tuple, list, dict, slice, complex, pathlib.PurePosixPath, pathlib.PosixPath,
]


def _hostile(sentinel: Path) -> list[Call]:
    """Calls that would each create ``sentinel`` (or delete it) if ever run."""
    s = str(sentinel)
    return [
        Call(os.system, (f"touch {s}",)),
        Call(builtins.eval, (f"open({s!r}, 'w')",)),
        Call(builtins.exec, (f"open({s!r}, 'w')",)),
        Call(builtins.open, (s, "w")),
        Call(subprocess.Popen, (["touch", s],)),
        Call(builtins.getattr, (Call(builtins.__import__, ("os",)), "system")),
        Call(builtins.__import__, ("os",)),
        Call(shutil.rmtree, (s,)),
        Call(torch.load, (s,)),
        Call(pickle.loads, (b"",)),
    ]


def _calls(sentinel: Path) -> st.SearchStrategy:
    leaf = _plain | st.sampled_from(_hostile(sentinel))
    return st.recursive(
        leaf,
        lambda inner: st.builds(Call, st.sampled_from(ALLOWED), st.tuples() | st.tuples(inner)
                                | st.tuples(inner, inner) | st.tuples(inner, inner, inner))
        | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=8,
    )


def _contains_hostile(obj: Any) -> bool:
    if isinstance(obj, Call):
        return obj.fn not in ALLOWED or any(_contains_hostile(a) for a in obj.args)
    if isinstance(obj, (list, tuple, frozenset)):
        return any(_contains_hostile(x) for x in obj)
    if isinstance(obj, dict):
        return any(_contains_hostile(x) for x in obj.values())
    return False


def test_pickled_calls_never_run_and_raise_documented_errors(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Allow-listed constructors with any arguments, hostile callables anywhere: never run, documented errors.

    Unpickling stops at the first failure, so a hostile call behind a broken
    allowed one raises that one's IntegrityError; a hostile call at the top
    is always refused by name (UnsupportedFormatError).  Whether a returned
    Metadata is structurally sound is the pinned defect below.
    """
    d = _metadata_file(tmp_path_factory)
    sentinel = d / "ran"
    sentinel.mkdir()  # rmtree would remove it; everything else would create "ran/x"
    sentinel = sentinel / "x"

    @_settings(300)
    @given(_calls(sentinel), st.integers(0, pickle.HIGHEST_PROTOCOL))
    def run(obj: Any, protocol: int) -> None:
        (d / ".metadata").write_bytes(pickle.dumps(obj, protocol=protocol))
        error: CheckpointError | None = None
        with _no_hang():
            try:
                out = read_metadata(d)
            except CheckpointError as exc:
                error = exc
        assert not sentinel.exists() and sentinel.parent.exists(), "a pickled call ran"
        if error is None:  # calls of allow-listed types can build a Metadata: only that passes
            assert isinstance(out, dcp_md.Metadata) and not _contains_hostile(obj)
        elif isinstance(obj, Call) and obj.fn not in ALLOWED:  # its global comes first
            assert isinstance(error, UnsupportedFormatError), repr(error)

    run()


def test_a_pickled_system_call_anywhere_is_refused_with_its_name(tmp_path: Path) -> None:
    """The negative control of the sentinel: the same pickle unpickled by ``pickle`` does run."""
    sentinel = tmp_path / "ran"
    blob = pickle.dumps({"x": [Call(os.system, (f"touch {sentinel}",))]})
    (tmp_path / ".metadata").write_bytes(blob)
    with pytest.raises(UnsupportedFormatError, match="system"):
        read_metadata(tmp_path)
    assert not sentinel.exists()
    pickle.loads(blob)  # what DCP's own reader does
    assert sentinel.exists()


# -- pinned defects (metadata.py / reader.py are owned elsewhere) ----------------------


def _frame_claiming(length: int) -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", length) + b"N."


@pytest.mark.parametrize("blob", [
    _frame_claiming((1 << 64) - 1),  # FRAME larger than sys.maxsize: OverflowError
    b"\x80\x04\x8d" + struct.pack("<Q", (1 << 64) - 1) + b".",  # BINUNICODE8
], ids=["frame", "binunicode8"])
def test_a_huge_length_claim_is_an_integrity_error(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / ".metadata").write_bytes(blob)
    with pytest.raises(IntegrityError):
        read_metadata(tmp_path)


def test_an_unknown_layout_name_is_an_integrity_error(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Call(torch.serialization._get_layout, ("torch.bogus",))))
    with pytest.raises(IntegrityError):
        read_metadata(tmp_path)


def test_a_chunk_without_storage_entry_is_an_integrity_error(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    d = tmp_path / "ck"
    shutil.copytree(originals["torchaux"], d)
    md = read_metadata(d)
    md.storage_data = {k: v for k, v in md.storage_data.items()
                       if not (isinstance(k, dcp_md.MetadataIndex) and k.fqn == "w")}
    (d / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(IntegrityError):
        td.load_full(d)


def _rewrite_metadata(originals: dict[str, Path], tmp_path: Path, change: Any) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(originals["torchaux"], d)
    md = read_metadata(d)
    change(md)
    (d / ".metadata").write_bytes(pickle.dumps(md))
    return d


def test_a_tensor_claiming_a_terabyte_fails_before_any_allocation(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    """DCP's full-load planner would torch.empty the claimed size; the check refuses it first."""
    def grow(md: Any) -> None:
        entry = md.state_dict_metadata["w"]
        entry.size = torch.Size([1 << 38])  # 1 TiB of float32
        entry.chunks[0].sizes = torch.Size([1 << 38])

    d = _rewrite_metadata(originals, tmp_path, grow)
    with _no_hang(), pytest.raises(IntegrityError, match="raw bytes"):
        td.load_full(d)


def test_a_chunk_outside_its_tensor_is_an_integrity_error(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    def shift(md: Any) -> None:
        md.state_dict_metadata["w"].chunks[0].offsets = torch.Size([1])

    with pytest.raises(IntegrityError, match="outside the tensor"):
        read_metadata(_rewrite_metadata(originals, tmp_path, shift))


def test_a_stored_range_past_the_end_of_its_file_is_an_integrity_error(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    def stretch(md: Any) -> None:
        for key, info in md.storage_data.items():
            if isinstance(key, dcp_md.MetadataIndex) and key.fqn == "w":
                info.length = 1 << 40

    with pytest.raises(IntegrityError, match="is truncated: it holds"):
        read_metadata(_rewrite_metadata(originals, tmp_path, stretch))


def test_a_storage_entry_missing_a_field_is_an_integrity_error(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    def strip(md: Any) -> None:
        for key, info in md.storage_data.items():
            if isinstance(key, dcp_md.MetadataIndex) and key.fqn == "w":
                del info.length

    with pytest.raises(IntegrityError, match="no field 'length'"):
        read_metadata(_rewrite_metadata(originals, tmp_path, strip))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchaux", "torchaux AES-GCM"])
def test_ten_thousand_damaged_data_files(
    name: str, originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The slow run: 10,000 mutated data files per torchaux checkpoint kind."""
    _fuzz_data_file(_case(originals, name, tmp_path_factory), 10_000)


@pytest.mark.slow
def test_ten_thousand_generated_pickles(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow run: 10,000 generated pickles of calls and 10,000 of plain objects."""
    monkeypatch.setenv("TORCHAUX_FUZZ_EXAMPLES", os.environ.get("TORCHAUX_FUZZ_EXAMPLES", "10000"))
    test_pickled_calls_never_run_and_raise_documented_errors(tmp_path_factory)
    test_pickles_of_plain_objects_are_not_metadata(tmp_path_factory)


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/passwd", "sub/x.distcp", ".."])
def test_a_data_file_outside_the_checkpoint_is_refused(
    originals: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """A crafted .metadata naming a data file outside the directory raises before any read of it."""
    d = tmp_path / "ck"
    shutil.copytree(originals["torchaux"], d)
    (tmp_path / "outside.distcp").write_bytes((d / _data_file(d)).read_bytes())  # a readable decoy
    md = read_metadata(d)
    for info in md.storage_data.values():
        if hasattr(info, "relative_path"):
            info.relative_path = name
    (d / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(IntegrityError, match="not a plain file name"):
        td.load_full(d)
    td.load_full(originals["torchaux"])  # control: the untouched checkpoint loads
