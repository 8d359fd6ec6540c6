"""load_checkpoint: argument checks, format detection, interop and safety.

The format comes from the content, never the name; nothing beyond
``torch.load(weights_only=True)`` is unpickled; loaded tensors own their
memory.
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings
import zipfile
from typing import Any

import pytest
import torch
from secure_helpers import (
    APPEND_SCALARS,
    ENCRYPTION_IDS,
    ENCRYPTIONS,
    FORMATS,
    assert_entries,
    expected_entries,
    sample_state,
)

import torchaux
from torchaux import DecryptionError, IntegrityError
from torchaux.checkpoint.load import detect_format


def _saved(tmp_path: Any, fmt: str = "ckpt", name: str = "m.bin", **kwargs: Any) -> str:
    path = os.path.join(os.path.realpath(tmp_path), name)
    torchaux.save_checkpoint(sample_state(), path, append_dict=dict(APPEND_SCALARS), format=fmt,
                             **kwargs)
    return path


EXPECTED = expected_entries(sample_state(), APPEND_SCALARS)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dec_key": "0123456789abcdef"}, TypeError),
        ({"dec_key": bytearray(16)}, TypeError),
        ({"dec_key": bytes(5)}, ValueError),
        ({"dec_key": bytes(24), "dec_mode": "SM4-CBC"}, ValueError),
        ({"dec_key": bytes(16), "dec_mode": "AES-XTS"}, ValueError),
        ({"dec_mode": 1}, TypeError),
        ({"dec_key": 16, "dec_mode": None}, TypeError),
        ({"crc_check": 1}, TypeError),
        ({"crc_check": None}, TypeError),
        ({"format": "pt"}, ValueError),
        ({"format": "CKPT"}, ValueError),
        ({"choice_func": "conv"}, TypeError),
        ({"filter_prefix": 3}, TypeError),
        ({"specify_prefix": []}, ValueError),
    ],
    ids=["key-str", "key-bytearray", "key-short", "sm4-key-24", "mode-unknown", "mode-int",
         "key-int-mode-none",
         "crc-int", "crc-none", "format-pt", "format-upper", "choice-str", "filter-int",
         "specify-empty"],
)
def test_bad_argument_rejected_before_reading(
    tmp_path: Any, kwargs: dict[str, Any], error: type
) -> None:
    """Bad arguments raise TypeError/ValueError before the file is looked at (even if missing)."""
    with pytest.raises(error) as info:
        torchaux.load_checkpoint(tmp_path / "missing.ckpt", **kwargs)
    assert "does not exist" not in str(info.value)


def test_path_kinds(tmp_path: Any) -> None:
    """A str, a pathlib.Path and a symlink all load; a directory raises ValueError."""
    path = _saved(tmp_path)
    link = tmp_path / "link.ckpt"
    link.symlink_to(path)
    for target in (path, pathlib.Path(path), link):
        assert_entries(torchaux.load_checkpoint(target), EXPECTED)
    with pytest.raises(ValueError, match="does not exist"):
        torchaux.load_checkpoint(tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("enc", ENCRYPTIONS[:2] + ENCRYPTIONS[-1:], ids=["plain", "gcm", "sm4"])
def test_detect_format_and_explicit_format(
    tmp_path: Any, fmt: str, enc: tuple[str, bytes | None, str]
) -> None:
    """The content decides the format; format= must match the (decrypted) content."""
    _, key, mode = enc
    path = _saved(tmp_path, fmt, name="misleading.safetensors" if fmt == "ckpt" else "m.ckpt",
                  enc_key=key, enc_mode=mode)
    with open(path, "rb") as f:
        assert detect_format(f.read(16)) == (fmt if key is None else "encrypted")
    assert_entries(torchaux.load_checkpoint(path, dec_key=key, dec_mode=mode, format=fmt), EXPECTED)
    other = "safetensors" if fmt == "ckpt" else "ckpt"
    with pytest.raises(ValueError, match="format"):
        torchaux.load_checkpoint(path, dec_key=key, dec_mode=mode, format=other)


def test_loads_plain_torch_save(tmp_path: Any) -> None:
    """A torch.save'd dict of tensors and scalars loads like a save_checkpoint file."""
    path = tmp_path / "plain.pt"
    torch.save(EXPECTED, path)
    assert_entries(torchaux.load_checkpoint(path), EXPECTED)


def test_loads_safetensors_written_by_the_library(tmp_path: Any) -> None:
    """A file from safetensors.torch.save_file loads, with or without metadata."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {k: v.contiguous() for k, v in sample_state().items()}
    for metadata in (None, {"format": "pt", "other": "x"}):
        path = tmp_path / "lib.safetensors"
        safetensors_torch.save_file(tensors, path, metadata=metadata)
        assert_entries(torchaux.load_checkpoint(path, format="safetensors"), tensors)


@pytest.mark.parametrize(
    "obj",
    [[torch.ones(2)], {1: torch.ones(2)}, torch.ones(2), ("w", torch.ones(2))],
    ids=["list", "int-keys", "tensor", "tuple"],
)
def test_torch_save_of_non_dict_is_integrity_error(tmp_path: Any, obj: Any) -> None:
    """A torch.save file that is not a str-keyed dict raises IntegrityError."""
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(IntegrityError, match="dict"):
        torchaux.load_checkpoint(path)


class _Touch:
    """Unpickling this creates a file: the code a malicious checkpoint would run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_no_code_runs_on_load(tmp_path: Any) -> None:
    """A checkpoint whose pickle would run code is refused, and the code never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"w": torch.ones(2), "x": _Touch(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the type is the next test's business
        torchaux.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [functools.partial(print, "x"), _Touch("never-created")],
    ids=["partial", "reduce"],
)
def test_not_weights_only_file_is_integrity_error(tmp_path: Any, payload: Any) -> None:
    """A torch.save file with non-weights objects raises IntegrityError (a ValueError)."""
    path = tmp_path / "other.ckpt"
    torch.save({"w": torch.ones(2), "x": payload}, path)
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(path)


def _with_data_pkl(tmp_path: Any, pickle_bytes: bytes) -> str:
    """A save_checkpoint zip whose data.pkl is replaced (member CRCs stay valid)."""
    good = _saved(tmp_path, name="good.ckpt")
    out = str(tmp_path / "bad.ckpt")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    return out


@pytest.mark.parametrize("crc", [False, True], ids=["nocrc", "crc"])
@pytest.mark.parametrize(
    "pickle_bytes",
    [b"\x80\x02h\x05.", b"\x80\x02."],
    ids=["memo-get-missing", "stop-on-empty-stack"],
)
def test_malformed_data_pkl_is_integrity_error(
    tmp_path: Any, pickle_bytes: bytes, crc: bool
) -> None:
    """A zip whose data.pkl is a malformed pickle raises IntegrityError, not KeyError/IndexError."""
    path = _with_data_pkl(tmp_path, pickle_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # crc_check: "no content CRC"
        with pytest.raises(IntegrityError):
            torchaux.load_checkpoint(path, crc_check=crc)


@pytest.mark.parametrize("fmt", FORMATS)
def test_map_location_meta(tmp_path: Any, fmt: str) -> None:
    """map_location="meta" gives meta tensors of the saved dtypes and shapes; scalars unchanged."""
    loaded = torchaux.load_checkpoint(_saved(tmp_path, fmt), map_location="meta")
    assert set(loaded) == set(EXPECTED)
    for k, want in EXPECTED.items():
        got = loaded[k]
        if isinstance(want, torch.Tensor):
            assert (got.device.type, got.dtype, got.shape) == ("meta", want.dtype, want.shape), k
        else:
            assert got == want and type(got) is type(want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("enc", ENCRYPTIONS[:2], ids=ENCRYPTION_IDS[:2])
def test_loaded_tensors_own_their_memory(
    tmp_path: Any, fmt: str, enc: tuple[str, bytes | None, str]
) -> None:
    """Loaded tensors are writable and unaffected when the file is later overwritten or deleted."""
    _, key, mode = enc
    path = _saved(tmp_path, fmt, enc_key=key, enc_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "The given buffer is not writable"
        loaded = torchaux.load_checkpoint(path, dec_key=key, dec_mode=mode)
    with open(path, "r+b") as f:
        f.write(bytes(os.path.getsize(path)))
    os.remove(path)
    assert_entries(loaded, EXPECTED)
    loaded["conv.weight"].add_(1)
    assert not torch.equal(loaded["conv.weight"], EXPECTED["conv.weight"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_into_net_is_strict_when_asked(tmp_path: Any, fmt: str) -> None:
    """load_checkpoint(net=, strict_load=True) refuses a dtype the net does not have."""
    path = os.path.join(os.path.realpath(tmp_path), "m")
    torchaux.save_checkpoint({"weight": torch.ones(1, 2, dtype=torch.float64),
                              "bias": torch.ones(1)}, path, format=fmt)
    net = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        torchaux.load_checkpoint(path, net=net, strict_load=True)
    with pytest.warns(UserWarning, match="converting"):
        torchaux.load_checkpoint(path, net=net)
    assert torch.equal(net.weight, torch.ones(1, 2))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("enc", ENCRYPTIONS[1:], ids=ENCRYPTION_IDS[1:])
def test_dec_mode_none_uses_the_recorded_mode(
    tmp_path: Any, fmt: str, enc: tuple[str, bytes, str]
) -> None:
    """dec_mode=None decrypts with the mode the file records; the key is still checked."""
    _, key, mode = enc
    path = _saved(tmp_path, fmt, enc_key=key, enc_mode=mode)
    assert_entries(torchaux.load_checkpoint(path, dec_key=key, dec_mode=None), EXPECTED)
    with pytest.raises(DecryptionError):
        torchaux.load_checkpoint(path, dec_key=bytes(len(key)), dec_mode=None)
