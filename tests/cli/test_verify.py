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
