"""torchaux.load (checkpoint/loader.py): every format x map_location x mmap, interop, errors, memory."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torchaux
from torchaux import _knobs
from torchaux.errors import DecryptionError, IntegrityError

KEY = bytes(range(32))
# Small encrypted chunks, so tensors straddle chunk boundaries and one chunk
# holds several records (the scatter paths of crypto/seekable.py).
CHUNK = 4096


def _state() -> dict[str, Any]:
    base = torch.arange(5000, dtype=torch.float32)
    return {
        "w": torch.randn(64, 33),
        "half": torch.randn(3000).to(torch.bfloat16),
        "ints": torch.arange(7000, dtype=torch.int64),
        "mask": torch.rand(999) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "view": base[10:20],
        "base": base,
    }


def _flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    # safetensors cannot share storage: views become owned copies there.
    return {k: v.clone() for k, v in state.items()}


# name -> (writer(state, path), load kwargs, mmap allowed)
def _formats() -> dict[str, tuple[Any, dict[str, Any], bool]]:
    def torch_save(s: dict[str, Any], p: Path) -> None:
        torch.save(s, p)

    def ckpt(**kw: Any) -> Any:
        def write(s: dict[str, Any], p: Path) -> None:
            with _knobs.override(encryption_chunk_bytes=CHUNK):
                torchaux.save_checkpoint(s, str(p), **kw)
        return write

    def safetensors_lib(s: dict[str, Any], p: Path) -> None:
        from safetensors.torch import save_file

        save_file(_flat(s), str(p))

    enc = {"dec_key": KEY}
    return {
        "torch.save": (torch_save, {}, True),
        "ckpt": (ckpt(), {}, True),
        "ckpt+crc": (ckpt(crc_check=True), {"crc_check": True}, True),
        "AES-GCM+crc": (ckpt(crc_check=True, enc_key=KEY, enc_mode="AES-GCM"), enc, False),
        "AES-CBC": (ckpt(enc_key=KEY, enc_mode="AES-CBC"), enc, False),
        "SM4-CBC": (ckpt(enc_key=KEY[:16], enc_mode="SM4-CBC"), {"dec_key": KEY[:16]}, False),
        "safetensors": (safetensors_lib, {}, True),
        "ckpt-safetensors+crc": (ckpt(format="safetensors", crc_check=True), {}, True),
        "safetensors+AES-GCM": (ckpt(format="safetensors", enc_key=KEY, enc_mode="AES-GCM"),
                                enc, False),
    }


FORMATS = _formats()
LOCATIONS = {
    "None": None, "cpu": "cpu", "device": torch.device("cpu"), "dict": {"cpu": "cpu"},
    "callable": lambda storage, location: storage, "meta": "meta",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    state = _state()
    out = {}
    for name, (write, _, _) in FORMATS.items():
        out[name] = root / f"{name}.bin"
        write(state, out[name])
    out["state"] = root / "state.pt"
    torch.save(state, out["state"])
    return out


def _expected(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    return torch.load(files["state"], weights_only=True)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("where", sorted(LOCATIONS))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip(files: dict[str, Path], fmt: str, where: str, mmap: bool) -> None:
    _, kwargs, mmap_ok = FORMATS[fmt]
    if mmap and not mmap_ok:
        with pytest.raises(ValueError, match="mmap=True"):
            torchaux.load(files[fmt], mmap=True, **kwargs)
        return
    if "safetensors" in fmt and where in ("callable", "meta"):
        pytest.skip("safetensors holds no storage locations; torch.load refuses these too")
    if where == "meta" and kwargs.get("crc_check"):
        with pytest.raises(ValueError, match="meta map_location reads none"):
            torchaux.load(files[fmt], "meta", mmap=mmap, **kwargs)
        kwargs = {**kwargs, "crc_check": None}
    out = torchaux.load(files[fmt], LOCATIONS[where], mmap=mmap, **kwargs)
    expected = _expected(files)
    assert sorted(out) == sorted(expected)
    for name, value in expected.items():
        got = out[name]
        assert got.dtype == value.dtype and got.shape == value.shape, name
        if where == "meta":
            assert got.device.type == "meta"
        else:
            assert torch.equal(got, value), name


@pytest.mark.parametrize("fmt", ["torch.save", "ckpt", "AES-GCM+crc"])
def test_views_share_storage_like_torch_load(files: dict[str, Path], fmt: str) -> None:
    out = torchaux.load(files[fmt], **FORMATS[fmt][1])
    assert out["view"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()
    assert out["view"].storage_offset() == 10


def test_load_checkpoint_agrees(files: dict[str, Path]) -> None:
    for fmt, (_, kwargs, _) in FORMATS.items():
        if fmt in ("torch.save", "safetensors"):
            continue
        if "dec_key" in kwargs:
            kwargs = {**kwargs, "dec_mode": None}  # load_checkpoint's default is AES-GCM
        got = torchaux.load_checkpoint(str(files[fmt]), **kwargs)
        assert all(torch.equal(got[k], v) for k, v in _expected(files).items()), fmt


def test_any_weights_only_object_and_file_objects(tmp_path: Path) -> None:
    obj = {"a": [torch.ones(3), (1, "x", None)], "b": {"c": torch.zeros(2, dtype=torch.int8)}}
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    expected = torch.load(path, weights_only=True)
    with open(path, "rb") as f:
        via_fd = torchaux.load(f)
    via_bytes = torchaux.load(io.BytesIO(path.read_bytes()))
    for got in (torchaux.load(path), via_fd, via_bytes):
        assert str(got) == str(expected)
    legacy = tmp_path / "legacy.pt"  # not a zip: handed to torch.load
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    assert str(torchaux.load(legacy)) == str(expected)


def test_refuses_what_is_not_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"f": torch.nn.Linear(2, 2)}, path)  # a module pickles its class
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torchaux.load(path)
    with pytest.raises(ValueError, match="use torch.load"):
        torchaux.load(path, weights_only=False)
    with pytest.raises(ValueError, match="pickle_module must be None"):
        torchaux.load(path, pickle_module=pickle)
    with pytest.raises(TypeError, match="mmap must be a bool"):
        torchaux.load(path, mmap="yes")


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_crc_mismatch_raises(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    data = files["ckpt+crc"].read_bytes()
    bad.write_bytes(data)
    _flip(bad, data.index(torch.arange(7000, dtype=torch.int64)[100:102].numpy().tobytes()))
    for crc in (None, True):  # None: the file records a content CRC, so it is checked
        with pytest.raises(IntegrityError, match="fails its CRC-32"):
            torchaux.load(bad, crc_check=crc)
    with pytest.raises(IntegrityError, match="fails its CRC-32"):
        torchaux.load_checkpoint(str(bad), crc_check=True)
    # Negative control: unchecked, the damaged bytes load (so the check above found them).
    out = torchaux.load(bad, crc_check=False)
    assert not torch.equal(out["ints"], _expected(files)["ints"])


def test_safetensors_crc_mismatch_raises(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(files["ckpt-safetensors+crc"].read_bytes())
    _flip(bad, bad.stat().st_size - 3)
    with pytest.raises(IntegrityError, match="crc_num"):
        torchaux.load(bad)
    torchaux.load(bad, crc_check=False)  # negative control


@pytest.mark.parametrize("fmt", ["AES-GCM+crc", "AES-CBC", "SM4-CBC"])
def test_encrypted_errors(files: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    kwargs = FORMATS[fmt][1]
    key = kwargs["dec_key"]
    with pytest.raises(DecryptionError, match="wrong key"):
        torchaux.load(files[fmt], dec_key=bytes(len(key)))
    with pytest.raises(DecryptionError, match="pass dec_key"):
        torchaux.load(files[fmt])
    data = files[fmt].read_bytes()
    tampered = tmp_path / "t.bin"
    tampered.write_bytes(data)
    _flip(tampered, len(data) // 2)  # a chunk in the middle, all tensor bytes
    with pytest.raises(DecryptionError, match="failed authentication"):
        torchaux.load(tampered, **kwargs)
    for cut in (len(data) - 1, 92 + 3 * (CHUNK + 64), 100):
        tampered.write_bytes(data[:cut])
        with pytest.raises(IntegrityError):
            torchaux.load(tampered, **kwargs)
    with pytest.raises(DecryptionError, match="not encrypted"):
        torchaux.load(files["ckpt"], dec_key=key)


def test_truncated_and_empty_plain_files(files: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.pt"
    data = files["torch.save"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError):
        torchaux.load(cut)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(IntegrityError, match="empty"):
        torchaux.load(empty)


_MEASURE = textwrap.dedent("""
    import io, json, sys, torch, torchaux
    from torchaux.cli.bench.measure import RssSampler
    path, how = sys.argv[1], sys.argv[2]
    import torchaux.checkpoint.crypto.seekable, torchaux.checkpoint.formats.torch_save.reader
    with RssSampler() as rss:
        if how == "bytes+torch.load":  # the negative control: a whole-file copy first
            out = torch.load(io.BytesIO(open(path, "rb").read()), weights_only=True)
        elif how == "encrypted":
            out = torchaux.load_checkpoint(path, dec_key=bytes(32), crc_check=True)
        else:
            out = torchaux.load(path)
    print(json.dumps({"growth": rss.peak - rss.base,
                      "loaded": sum(t.numel() * t.element_size() for t in out.values())}))
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_peak_memory_is_the_tensors_plus_bounded_buffers(tmp_path: Path) -> None:
    state = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(128)}  # 512 MiB
    plain, enc = tmp_path / "s.pt", tmp_path / "s.ckpt"
    torch.save(state, plain)
    torchaux.save_checkpoint(state, str(enc), crc_check=True, enc_key=bytes(32))
    del state

    def growth(path: Path, how: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), how],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        return r["growth"], r["loaded"]

    bound = 96 << 20  # thread stacks, chunk buffers, the pickle, allocator slack
    for path, how in ((plain, "plain"), (enc, "encrypted")):
        used, loaded = growth(path, how)
        assert loaded == 512 << 20
        assert used < loaded + bound, (how, used >> 20)
    used, loaded = growth(plain, "bytes+torch.load")  # the bound can fail: a copy exceeds it
    assert used > loaded + bound
