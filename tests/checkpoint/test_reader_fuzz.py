"""Property-based fuzzing of every reader: hostile bytes raise only documented errors, fast.

Each reader — the torch.save zip (``load_checkpoint`` of a ckpt), safetensors,
and the encrypted envelope — gets random bytes and mutations of a valid file
(bit flips, overwrites with extreme integers at any offset, insertions,
deletions, truncation).  The only exceptions allowed are torchaux's
documented ones (``IntegrityError``, its subclass ``DecryptionError``, and
``UnsupportedFormatError``; all ``ValueError``); anything else — a
``RuntimeError`` from deep inside torch, a ``MemoryError``, a hang — is a
defect.  The default run is seeded and small; ``TORCHAUX_FUZZ_EXAMPLES``
(the slow run sets 10,000) makes it large.
"""

from __future__ import annotations

import os
import resource
import struct
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torchaux  # noqa: E402
from torchaux.errors import IntegrityError, UnsupportedFormatError  # noqa: E402

KEY = bytes(range(32))
DOCUMENTED = (IntegrityError, UnsupportedFormatError)  # DecryptionError is an IntegrityError
STATE = {"w": torch.arange(300, dtype=torch.float32), "b": torch.ones(7, dtype=torch.int64),
         "h": torch.zeros(3, 2, dtype=torch.float16)}

#: name -> (file name, save kwargs, load kwargs).
READERS = {
    "ckpt": ("f.ckpt", {}, {}),
    "ckpt+CRC": ("f.ckpt", {"crc_check": True}, {"crc_check": True}),
    "safetensors+CRC": ("f.safetensors", {"format": "safetensors", "crc_check": True},
                        {"crc_check": True}),
    "AES-GCM": ("f.ckpt", {"enc_key": KEY, "enc_mode": "AES-GCM"},
                {"dec_key": KEY, "dec_mode": "AES-GCM"}),
    "AES-CBC safetensors": ("f.safetensors", {"format": "safetensors", "enc_key": KEY,
                            "enc_mode": "AES-CBC"}, {"dec_key": KEY, "dec_mode": "AES-CBC"}),
}


def _examples(default: int) -> int:
    return int(os.environ.get("TORCHAUX_FUZZ_EXAMPLES", default))


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz-originals")
    out = {}
    for name, (fname, save_kw, _) in READERS.items():
        path = d / f"{name.replace(' ', '_')}-{fname}"
        torchaux.save_checkpoint(STATE, str(path), **save_kw)
        out[name] = path.read_bytes()
    return out


_EXTREMES = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("int"), st.integers(0, 1 << 20), st.sampled_from(_EXTREMES),
              st.sampled_from(["<I", "<Q", ">I", ">Q", "<H"])),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 256)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
)


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        at = op[1] % (len(buf) + 1)
        if op[0] == "flip" and at < len(buf):
            buf[at] ^= 1 << op[2]
        elif op[0] == "int":
            raw = struct.pack(op[3], op[2] & ((1 << (8 * struct.calcsize(op[3]))) - 1))
            buf[at:at + len(raw)] = raw
        elif op[0] == "insert":
            buf[at:at] = op[2]
        elif op[0] == "delete":
            del buf[at:at + op[2]]
        elif op[0] == "truncate":
            del buf[at:]
    return bytes(buf)


def _check(path: Path, blob: bytes, load_kw: dict, original: bytes) -> None:
    path.write_bytes(blob)
    try:
        state = torchaux.load_checkpoint(str(path), **load_kw)
    except DOCUMENTED:
        return
    # Loading succeeded: only possible for a change the format does not cover
    # (no CRC, no encryption), and then the result must still be well formed.
    assert isinstance(state, dict)
    if blob != original and ("crc_check" in load_kw or "dec_key" in load_kw):
        # Authenticated or CRC-checked formats: a loaded file must hold the original values.
        for k, v in STATE.items():
            assert torch.equal(state[k], v), f"a damaged file loaded with wrong values in {k!r}"


@pytest.mark.parametrize("reader", sorted(READERS))
def test_mutated_files_raise_only_documented_errors(
    reader: str, originals: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Mutations of a valid file: IntegrityError/DecryptionError/UnsupportedFormatError or the true values."""
    fname, _, load_kw = READERS[reader]
    path = tmp_path_factory.mktemp("fuzz") / fname

    @settings(max_examples=_examples(150), derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(ops: list[tuple]) -> None:
        _check(path, _mutate(originals[reader], ops), load_kw, originals[reader])

    run()


@pytest.mark.parametrize("reader", sorted(READERS))
def test_random_bytes_raise_only_documented_errors(
    reader: str, originals: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Random bytes, and random bytes behind a valid prefix (magic, zip header, JSON length)."""
    fname, _, load_kw = READERS[reader]
    path = tmp_path_factory.mktemp("fuzz") / fname

    @settings(max_examples=_examples(100), derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 128), st.binary(max_size=2048))
    def run(keep: int, tail: bytes) -> None:
        blob = originals[reader][:keep] + tail
        if blob == originals[reader]:
            return
        path.write_bytes(blob)
        with pytest.raises(DOCUMENTED):
            torchaux.load_checkpoint(str(path), **load_kw)

    run()


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("claim", [1 << 40, (1 << 64) - 1])
def test_safetensors_header_claiming_a_terabyte_fails_fast(tmp_path: Path, claim: int) -> None:
    """A header length of 1 TB (or 2**64-1) is checked against the file size before any allocation."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", claim) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    before = _max_rss_mib()
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(str(path))
    assert _max_rss_mib() - before < 64


def test_safetensors_tensor_claiming_a_terabyte_fails_fast(tmp_path: Path) -> None:
    """A tensor entry whose shape and offsets claim 1 TB of data fails before allocating it."""
    header = b'{"a":{"dtype":"F32","shape":[274877906944],"data_offsets":[0,1099511627776]}}'
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    before = _max_rss_mib()
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(str(path))
    assert _max_rss_mib() - before < 64


def test_zip_member_claiming_a_terabyte_fails_fast(tmp_path: Path, originals: dict[str, bytes]) -> None:
    """A zip central-directory entry claiming a 1 TB member is refused before reading it."""
    blob = bytearray(originals["ckpt+CRC"])
    cd = blob.rfind(b"PK\x01\x02")
    assert cd > 0
    blob[cd + 20:cd + 28] = struct.pack("<II", 0xFFFFFFFE, 0xFFFFFFFE)  # compressed, uncompressed
    path = tmp_path / "big.ckpt"
    path.write_bytes(bytes(blob))
    before = _max_rss_mib()
    with pytest.raises(DOCUMENTED):
        torchaux.load_checkpoint(str(path), crc_check=True)
    assert _max_rss_mib() - before < 64


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(READERS))
def test_ten_thousand_mutations_per_reader(
    reader: str, originals: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The slow run: 10,000 mutation cases per reader (TORCHAUX_FUZZ_EXAMPLES overrides)."""
    fname, _, load_kw = READERS[reader]
    path = tmp_path_factory.mktemp("fuzz") / fname

    @settings(max_examples=_examples(10_000), derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(ops: list[tuple]) -> None:
        _check(path, _mutate(originals[reader], ops), load_kw, originals[reader])

    run()
