"""``torchaux verify``: exit 0 only for complete, intact files; 1 for damage; 2 for usage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.save import ENC_MODES
from torchaux.cli.keys import DEC_KEY_ENV
from torchaux.cli.main import main

pytest.importorskip("cryptography")

# Distinct bytes, so a tensor's data can be found in a plaintext file.
WEIGHT = torch.arange(1000, dtype=torch.float32) * 1.5 + 0.25
KEYS = {"AES-GCM": bytes(range(32)), "AES-CBC": bytes(range(16)), "SM4-CBC": bytes(range(16))}
# Small chunks give multi-chunk files, so a cut at a chunk boundary is tested too.
CHUNK = 256
CASES = [(fmt, mode) for fmt in ("ckpt", "safetensors") for mode in (None, *ENC_MODES)]


def _save(tmp_path: Path, fmt: str = "ckpt", mode: str | None = None, *, crc: bool = True) -> str:
    path = str(tmp_path / f"m.{fmt}")
    with _knobs.override(encryption_chunk_bytes=CHUNK):
        torchaux.save_checkpoint(
            {"w": WEIGHT, "b": torch.ones(3)}, path, append_dict={"step": 9}, crc_check=crc,
            format=fmt, enc_key=KEYS[mode] if mode else None, enc_mode=mode or "AES-GCM",
        )
    return path


def _key_file(tmp_path: Path, key: bytes) -> str:
    path = tmp_path / "key.bin"
    path.write_bytes(key)
    path.chmod(0o600)
    return str(path)


def _verify(tmp_path: Path, path: str, mode: str | None, *extra: str) -> int:
    key = ["--dec-key-file", _key_file(tmp_path, KEYS[mode])] if mode else []
    return main(["verify", path, *key, *extra])


def _one_line_failure(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("torchaux verify: error: ") and captured.err.count("\n") == 1
    return captured.err


@pytest.mark.parametrize(("fmt", "mode"), CASES)
@pytest.mark.parametrize("crc", [True, False])
def test_intact_file_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, mode: str | None, crc: bool
) -> None:
    """Every format x encryption x CRC combination verifies, with one OK line."""
    assert _verify(tmp_path, _save(tmp_path, fmt, mode, crc=crc), mode) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and out.count("\n") == 1
    assert (mode or "not encrypted") in out and "2 tensors (3.9 KiB), 1 value" in out
    assert ("no crc_num" in out or "no content CRC" in out) is not crc


@pytest.mark.parametrize(("fmt", "mode"), CASES)
def test_flipped_byte_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, mode: str | None
) -> None:
    """One flipped bit in the tensor data (or ciphertext) is detected."""
    path = Path(_save(tmp_path, fmt, mode))
    data = bytearray(path.read_bytes())
    at = data.find(WEIGHT.numpy().tobytes()) + 2000 if mode is None else len(data) // 2
    assert at > 2000 or mode is not None
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert _verify(tmp_path, str(path), mode) == 1
    _one_line_failure(capsys)


def test_flipped_byte_without_content_crc_caught_by_member_crc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plaintext .ckpt saved without crc_check still fails on a flipped tensor byte."""
    path = Path(_save(tmp_path, "ckpt", crc=False))
    data = bytearray(path.read_bytes())
    data[data.find(WEIGHT.numpy().tobytes()) + 100] ^= 0x80
    path.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 1
    assert "CRC" in _one_line_failure(capsys)


@pytest.mark.parametrize("mode", ENC_MODES)
def test_flipped_header_byte_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """A flipped byte in the encryption header is detected (header CRC)."""
    path = Path(_save(tmp_path, "ckpt", mode))
    data = bytearray(path.read_bytes())
    data[30] ^= 0x01
    path.write_bytes(bytes(data))
    assert _verify(tmp_path, str(path), mode) == 1
    assert "header" in _one_line_failure(capsys)


def _record(mode: str) -> int:
    return CHUNK + (16 if mode == "AES-GCM" else 64)


@pytest.mark.parametrize(
    ("fmt", "mode", "cut"),
    [(fmt, mode, cut) for fmt, mode in CASES for cut in ("one-byte", "half", "chunk-boundary")
     if mode or cut != "chunk-boundary"],
)
def test_truncated_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, mode: str | None, cut: str
) -> None:
    """A file cut short anywhere (for encrypted files also at a chunk boundary) fails."""
    path = Path(_save(tmp_path, fmt, mode))
    data = path.read_bytes()
    if cut == "one-byte":
        keep = len(data) - 1
    elif cut == "half":
        keep = len(data) // 2
    else:
        assert mode is not None
        keep = 92 + 3 * _record(mode)
    path.write_bytes(data[:keep])
    assert _verify(tmp_path, str(path), mode) == 1
    _one_line_failure(capsys)


@pytest.mark.parametrize(("fmt", "mode"), [c for c in CASES if c[0] == "safetensors" or c[1]])
def test_appended_byte_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, mode: str | None
) -> None:
    """A byte appended to a safetensors or encrypted file is detected."""
    path = Path(_save(tmp_path, fmt, mode))
    path.write_bytes(path.read_bytes() + b"\0")
    assert _verify(tmp_path, str(path), mode) == 1
    _one_line_failure(capsys)


@pytest.mark.parametrize("mode", ENC_MODES)
def test_wrong_key_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    """A key of the right length but the wrong bytes fails with 'wrong key'."""
    path = _save(tmp_path, "safetensors", mode)
    wrong = bytes(b ^ 0xFF for b in KEYS[mode])
    assert main(["verify", path, "--dec-key-file", _key_file(tmp_path, wrong)]) == 1
    assert "wrong key" in _one_line_failure(capsys)


@pytest.mark.parametrize("mode", ENC_MODES)
def test_missing_key_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """An encrypted file without a key is a usage error naming both key sources."""
    monkeypatch.delenv(DEC_KEY_ENV, raising=False)
    assert main(["verify", _save(tmp_path, "ckpt", mode)]) == 2
    err = capsys.readouterr().err
    assert "--dec-key-file" in err and DEC_KEY_ENV in err and err.count("\n") == 1


def test_key_for_plaintext_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decryption key (here from the environment) for an unencrypted file fails: a swap?"""
    monkeypatch.setenv(DEC_KEY_ENV, "ab" * 16)
    assert main(["verify", _save(tmp_path)]) == 1
    assert "not encrypted" in _one_line_failure(capsys)


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_require_crc(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    """--require-crc fails a file saved without a CRC and passes one saved with it."""
    assert main(["verify", _save(tmp_path, fmt, crc=False), "--require-crc"]) == 1
    assert "records no CRC" in _one_line_failure(capsys)
    assert main(["verify", _save(tmp_path, fmt, crc=True), "--require-crc"]) == 0


def test_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that does not exist is not intact: exit 1."""
    assert main(["verify", str(tmp_path / "gone.ckpt")]) == 1
    _one_line_failure(capsys)


def test_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-q verifies silently: exit status only."""
    assert main(["verify", "-q", _save(tmp_path)]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("mode", [None, "AES-GCM"])
def test_progress_bar_renders_when_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str | None
) -> None:
    """--progress draws a bar on stderr that reaches 100%; stdout keeps the OK line."""
    assert _verify(tmp_path, _save(tmp_path, "safetensors", mode), mode, "--progress") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("OK ")
    assert "m.safetensors" in captured.err and "100%" in captured.err
    assert "B/s]" in captured.err


# -- distributed checkpoint directories (torchaux verify DIR) -------------------------------

import io  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import zipfile  # noqa: E402

import sharded_workers  # noqa: E402 - tests/cli helper: 2 spawned gloo ranks save once
from torchaux.cli.sharded import read_index  # noqa: E402

DIR_KEY = sharded_workers.KEY


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharded_workers.checkpoints(tmp_path_factory)


def _copy(sharded: Path, tmp_path: Path, kind: str) -> Path:
    d = tmp_path / kind
    shutil.copytree(sharded / kind, d)
    return d


def _dir_verify(tmp_path: Path, d: Path, *extra: str, key: bytes | None = None) -> int:
    with_key = ["--dec-key-file", _key_file(tmp_path, key)] if key else []
    return main(["verify", str(d), *with_key, *extra])


def _tensor_byte(d: Path, rank: int) -> tuple[Path, int, str]:
    """A byte of tensor data in rank ``rank``'s file (inside a zip member: covered by its CRC)."""
    ix = read_index(str(d))
    f = next(f for f in ix.files.values() if f.rank == rank)
    c = next(c for c in f.chunks if c.kind == "tensor" and c.fqn == "rows")
    path = d / f.name
    if c.encrypted:
        return path, c.offset + c.length // 2, c.fqn
    raw = path.read_bytes()[c.offset:c.offset + c.length]
    info = next(i for i in zipfile.ZipFile(io.BytesIO(raw)).infolist() if i.filename.endswith("data/0"))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return path, c.offset + info.header_offset + 30 + name_len + extra_len + 5, c.fqn


@pytest.mark.multiprocess
@pytest.mark.parametrize(("kind", "key", "says"), [
    ("plain", None, "xxh3-64 checksums of every chunk verified; not encrypted"),
    ("stock", None, "no checksums recorded (stock DCP); not encrypted, zip CRCs"),
    ("encrypted", DIR_KEY, "AES-GCM, every chunk decrypted and authenticated"),
    ("encrypted", None, "chunks NOT decrypted (no key"),
])
def test_intact_dir_exits_0(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
    key: bytes | None, says: str,
) -> None:
    """The negative control of the damage tests: copies of intact directories pass."""
    d = _copy(sharded, tmp_path, kind)
    assert _dir_verify(tmp_path, d, key=key) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {d}: distributed, 2 ranks, 2 files") and says in out


@pytest.mark.multiprocess
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(("kind", "key", "says"), [
    ("plain", None, "checksum mismatch"),
    ("stock", None, "fails its CRC-32 check"),
    ("encrypted", DIR_KEY, "checksum mismatch"),
    ("encrypted", None, "checksum mismatch"),
])
def test_flipped_byte_in_any_rank_file_names_file_and_tensor(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
    key: bytes | None, says: str, rank: int,
) -> None:
    d = _copy(sharded, tmp_path, kind)
    path, offset, fqn = _tensor_byte(d, rank)
    sharded_workers.flip_byte(path, offset)
    assert _dir_verify(tmp_path, d, key=key) == 1
    err = _one_line_failure(capsys)
    assert path.name in err and repr(fqn) in err and says in err, err


@pytest.mark.multiprocess
def test_stock_dir_flip_passes_without_its_zip_crcs_negative_control(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stock-DCP flip above is found by the zip CRCs alone: without them it would pass."""
    from torchaux.cli.sharded import check

    d = _copy(sharded, tmp_path, "stock")
    sharded_workers.flip_byte(*_tensor_byte(d, 1)[:2])
    monkeypatch.setattr(check.integrity, "verify_zip_crc", lambda raw, label: False)
    assert _dir_verify(tmp_path, d) == 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["plain", "stock", "encrypted"])
def test_missing_rank_file_exits_1(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    d = _copy(sharded, tmp_path, kind)
    victim = sharded_workers.data_files(d)[1]
    victim.unlink()
    assert _dir_verify(tmp_path, d) == 1
    err = _one_line_failure(capsys)
    assert victim.name in err and "(rank 1)" in err and "missing" in err and "incomplete" in err


@pytest.mark.multiprocess
@pytest.mark.parametrize(("cut", "says"), [(-7, "is truncated"), (3, "appended to")])
def test_truncated_or_grown_rank_file_exits_1(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int, says: str
) -> None:
    d = _copy(sharded, tmp_path, "plain")
    victim = sharded_workers.data_files(d)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:cut] if cut < 0 else data + bytes(cut))
    assert _dir_verify(tmp_path, d) == 1
    err = _one_line_failure(capsys)
    assert victim.name in err and says in err


@pytest.mark.multiprocess
def test_missing_metadata_exits_1(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy(sharded, tmp_path, "plain")
    (d / ".metadata").unlink()
    assert _dir_verify(tmp_path, d) == 1
    assert "no committed distributed checkpoint" in _one_line_failure(capsys)


@pytest.mark.multiprocess
def test_metadata_naming_a_file_outside_the_dir_exits_1(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    d = _copy(sharded, tmp_path, "stock")
    meta = read_index(str(d)).metadata
    key = next(iter(meta.storage_data))
    meta.storage_data[key] = dataclasses.replace(meta.storage_data[key], relative_path="../x.distcp")
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    assert _dir_verify(tmp_path, d) == 1
    assert "not a plain file name" in _one_line_failure(capsys)


@pytest.mark.multiprocess
def test_dir_keys_and_require_crc(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong key and a key for plaintext fail (as for files); --require-crc fails stock DCP only."""
    assert _dir_verify(tmp_path, sharded / "encrypted", key=bytes(32)) == 1
    assert "wrong key" in _one_line_failure(capsys)
    assert _dir_verify(tmp_path, sharded / "plain", key=DIR_KEY) == 1
    assert "is not encrypted" in _one_line_failure(capsys)
    assert _dir_verify(tmp_path, sharded / "stock", "--require-crc") == 1
    assert "--require-crc" in _one_line_failure(capsys)
    assert _dir_verify(tmp_path, sharded / "plain", "--require-crc", "-q") == 0
    assert capsys.readouterr().out == ""
