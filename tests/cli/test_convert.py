"""``torchaux convert``: format changes and re-encryption that preserve every entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.checkpoint.crypto.envelope import describe_header
from torchaux.checkpoint.save import ENC_MODES
from torchaux.cli.inspect import inspect_file
from torchaux.cli.keys import DEC_KEY_ENV, ENC_KEY_ENV
from torchaux.cli.main import main

pytest.importorskip("cryptography")

TENSORS = {
    "w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
    "h": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    "n": torch.tensor([-1, 7], dtype=torch.int64),
    "m": torch.tensor([True, False]),
}
VALUES = {"epoch": 4, "lr": 0.125, "done": False, "name": "run-7"}
KEYS = {"AES-GCM": bytes(range(32)), "AES-CBC": bytes(range(24)), "SM4-CBC": bytes(range(16))}


def _save(path: Path, fmt: str = "ckpt", mode: str | None = None, *, crc: bool = True) -> str:
    torchaux.save_checkpoint(
        TENSORS, str(path), append_dict=VALUES, format=fmt, crc_check=crc,
        enc_key=KEYS[mode] if mode else None, enc_mode=mode or "AES-GCM",
    )
    return str(path)


def _key_file(tmp_path: Path, key: bytes, name: str) -> str:
    path = tmp_path / name
    path.write_text(key.hex())
    path.chmod(0o600)
    return str(path)


def _assert_same_entries(loaded: dict) -> None:
    assert set(loaded) == set(TENSORS) | set(VALUES)
    for name, t in TENSORS.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    for name, v in VALUES.items():
        assert type(loaded[name]) is type(v) and loaded[name] == v


def _mode_of(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0)
        return describe_header(f)["mode"] if head == b"\x89TAUXE\r\n" else None


def test_ckpt_safetensors_ckpt_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ckpt -> safetensors -> ckpt keeps every tensor (dtype, values) and append value (type)."""
    src = _save(tmp_path / "a.ckpt")
    mid, dst = str(tmp_path / "b.safetensors"), str(tmp_path / "c.ckpt")
    assert main(["convert", src, mid, "--format", "safetensors"]) == 0
    assert inspect_file(mid, None)["format"] == "safetensors"
    _assert_same_entries(torchaux.load_checkpoint(mid, crc_check=True))
    assert main(["convert", mid, dst, "--format", "ckpt"]) == 0
    assert inspect_file(dst, None)["format"] == "ckpt"
    _assert_same_entries(torchaux.load_checkpoint(dst, crc_check=True))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"converted {src} -> {mid}: safetensors, not encrypted, CRC")
    assert out[1].endswith("4 tensors (78 B), 4 values")


@pytest.mark.parametrize("src_mode", ENC_MODES)
@pytest.mark.parametrize("dst_mode", ENC_MODES)
def test_reencryption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], src_mode: str, dst_mode: str
) -> None:
    """An encrypted file converts to another mode and key; only the new key opens DST."""
    src = _save(tmp_path / "a.safetensors", "safetensors", src_mode)
    new_key = bytes(range(50, 66))
    dst = str(tmp_path / "b.ckpt")
    argv = ["convert", src, dst, "--format", "ckpt",
            "--dec-key-file", _key_file(tmp_path, KEYS[src_mode], "old.hex"),
            "--enc-key-file", _key_file(tmp_path, new_key, "new.hex"), "--enc-mode", dst_mode]
    assert main(argv) == 0
    assert f"{dst_mode} 128-bit (key file" in capsys.readouterr().out
    assert _mode_of(dst) == dst_mode
    _assert_same_entries(torchaux.load_checkpoint(dst, dec_key=new_key, dec_mode=dst_mode,
                                                  crc_check=True))
    with pytest.raises(torchaux.DecryptionError):
        torchaux.load_checkpoint(dst, dec_key=KEYS[src_mode][:16], dec_mode=dst_mode)


def test_keys_from_env_default_to_aes_gcm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys from TORCHAUX_DEC_KEY/TORCHAUX_ENC_KEY work; the default mode is AES-GCM."""
    src = _save(tmp_path / "a.ckpt", mode="SM4-CBC")
    monkeypatch.setenv(DEC_KEY_ENV, KEYS["SM4-CBC"].hex())
    monkeypatch.setenv(ENC_KEY_ENV, KEYS["AES-GCM"].hex())
    dst = str(tmp_path / "b.safetensors")
    assert main(["convert", src, dst, "--format", "safetensors"]) == 0
    assert f"AES-GCM 256-bit (env {ENC_KEY_ENV})" in capsys.readouterr().out
    assert _mode_of(dst) == "AES-GCM"
    _assert_same_entries(torchaux.load_checkpoint(dst, dec_key=KEYS["AES-GCM"]))


def test_decrypting_to_plaintext(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With only a decryption key, DST is written unencrypted."""
    src = _save(tmp_path / "a.ckpt", mode="AES-CBC")
    dst = str(tmp_path / "b.ckpt")
    key = _key_file(tmp_path, KEYS["AES-CBC"], "k.hex")
    assert main(["convert", src, dst, "--format", "ckpt", "--dec-key-file", key]) == 0
    assert _mode_of(dst) is None
    _assert_same_entries(torchaux.load_checkpoint(dst))


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_crc_on_by_default_and_off_with_no_crc(tmp_path: Path, fmt: str) -> None:
    """DST records a CRC unless --no-crc is given."""
    src = _save(tmp_path / "a.ckpt", crc=False)
    with_crc, without = str(tmp_path / f"b.{fmt}"), str(tmp_path / f"c.{fmt}")
    assert main(["convert", src, with_crc, "--format", fmt]) == 0
    assert main(["convert", src, without, "--format", fmt, "--no-crc"]) == 0
    assert inspect_file(with_crc, None)["crc"]["present"] is True
    assert inspect_file(without, None)["crc"]["present"] is False


def test_source_without_crc_gives_one_line_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Converting a source that records no CRC says so on stderr, in one line."""
    src = _save(tmp_path / "a.safetensors", "safetensors", crc=False)
    assert main(["convert", src, str(tmp_path / "b.ckpt"), "--format", "ckpt"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("torchaux convert: warning: ") and "crc_num" in err
    assert err.count("\n") == 1


def test_dst_is_private(tmp_path: Path) -> None:
    """DST gets mode 0600, like save_checkpoint's default."""
    dst = tmp_path / "b.ckpt"
    assert main(["convert", _save(tmp_path / "a.ckpt"), str(dst), "--format", "ckpt"]) == 0
    if os.name != "nt":
        assert dst.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("spelling", ["same", "dot-path", "symlink"])
def test_dst_equal_to_src_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    """DST naming SRC (directly, by another spelling, via a symlink) is a usage error; SRC kept."""
    src = _save(tmp_path / "a.ckpt")
    before = Path(src).read_bytes()
    dst = {"same": src, "dot-path": str(tmp_path / "." / "a.ckpt"),
           "symlink": str(tmp_path / "link.ckpt")}[spelling]
    if spelling == "symlink":
        os.symlink(src, dst)
    assert main(["convert", src, dst, "--format", "safetensors", "--force"]) == 2
    assert "is SRC" in capsys.readouterr().err
    assert Path(src).read_bytes() == before


def test_existing_dst_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An existing DST is kept (exit 2) unless --force replaces it."""
    src = _save(tmp_path / "a.ckpt")
    dst = tmp_path / "b.safetensors"
    dst.write_bytes(b"old")
    assert main(["convert", src, str(dst), "--format", "safetensors"]) == 2
    assert "--force" in capsys.readouterr().err and dst.read_bytes() == b"old"
    assert main(["convert", src, str(dst), "--format", "safetensors", "--force"]) == 0
    _assert_same_entries(torchaux.load_checkpoint(str(dst)))


def test_enc_mode_without_key_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--enc-mode with no encryption key exits 2 and writes nothing."""
    monkeypatch.delenv(ENC_KEY_ENV, raising=False)
    dst = tmp_path / "b.ckpt"
    argv = ["convert", _save(tmp_path / "a.ckpt"), str(dst), "--format", "ckpt",
            "--enc-mode", "AES-CBC"]
    assert main(argv) == 2
    assert "needs an encryption key" in capsys.readouterr().err and not dst.exists()


def test_key_unfit_for_mode_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 32-byte key with SM4-CBC (16 bytes only) exits 2 before reading SRC."""
    dst = tmp_path / "b.ckpt"
    argv = ["convert", _save(tmp_path / "a.ckpt"), str(dst), "--format", "ckpt",
            "--enc-key-file", _key_file(tmp_path, bytes(32), "k.hex"), "--enc-mode", "SM4-CBC"]
    assert main(argv) == 2
    assert "SM4-CBC needs a key of 16 bytes" in capsys.readouterr().err and not dst.exists()


def test_encrypted_source_without_key_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encrypted SRC without a decryption key is a usage error; nothing is written."""
    monkeypatch.delenv(DEC_KEY_ENV, raising=False)
    dst = tmp_path / "b.ckpt"
    assert main(["convert", _save(tmp_path / "a.ckpt", mode="AES-GCM"), str(dst),
                 "--format", "ckpt"]) == 2
    assert "--dec-key-file" in capsys.readouterr().err and not dst.exists()


def test_wrong_key_exits_1_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong decryption key exits 1 with one line; DST is not created."""
    dst = tmp_path / "b.ckpt"
    argv = ["convert", _save(tmp_path / "a.ckpt", mode="AES-GCM"), str(dst), "--format", "ckpt",
            "--dec-key-file", _key_file(tmp_path, bytes(32), "k.hex")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "wrong key" in err and err.count("\n") == 1 and not dst.exists()
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "k.hex"]  # no temp file left either


def test_unstorable_dtype_exits_1_and_keeps_old_dst(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tensor safetensors cannot hold fails in one line; an existing DST is untouched."""
    src = str(tmp_path / "a.ckpt")
    torchaux.save_checkpoint({"z": torch.zeros(2, dtype=torch.complex128)}, src)
    dst = tmp_path / "b.safetensors"
    dst.write_bytes(b"old")
    assert main(["convert", src, str(dst), "--format", "safetensors", "--force"]) == 1
    err = capsys.readouterr().err
    assert "complex128" in err and err.count("\n") == 1 and dst.read_bytes() == b"old"


def test_damaged_source_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A source whose content CRC does not match fails in one line; DST is not created."""
    src = Path(_save(tmp_path / "a.safetensors", "safetensors"))
    data = bytearray(src.read_bytes())
    data[-1] ^= 0x01
    src.write_bytes(bytes(data))
    dst = tmp_path / "b.ckpt"
    assert main(["convert", str(src), str(dst), "--format", "ckpt"]) == 1
    assert "crc" in capsys.readouterr().err.lower() and not dst.exists()


def test_progress_bar_renders_when_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--progress draws the write of DST on stderr, ending at 100%."""
    dst = str(tmp_path / "b.safetensors")
    assert main(["convert", _save(tmp_path / "a.ckpt"), dst, "--format", "safetensors",
                 "--progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("\rb.safetensors: ") and "100%" in err and err.endswith("B/s]\n")
    _assert_same_entries(torchaux.load_checkpoint(dst, crc_check=True))
