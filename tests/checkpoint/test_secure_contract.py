"""save_checkpoint / load_checkpoint contract: one property across every mode.

The round trip runs over async_save (sync, thread, process) x format (ckpt,
safetensors) x encryption (none and every mode / key length) x crc_check.
Whatever the combination, the loaded dict is exactly what was saved, the file
is private (0o600), an encrypted file never contains plaintext tensor bytes,
and a plaintext file loads with the reference reader of its format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from secure_helpers import (
    APPEND_SCALARS,
    ENCRYPTION_IDS,
    ENCRYPTIONS,
    FORMATS,
    MARKER,
    WAIT_S,
    assert_entries,
    close_process_saver,
    entries_mismatch,
    expected_entries,
    file_mode,
    sample_state,
)
from sinks import FailingSink, GatedSink

import torchaux
from torchaux import AsyncSaver
from torchaux.checkpoint.engine.process_saver import ProcessSaver

MODES = [False, "thread", "process"]
MODE_IDS = ["sync", "thread", "process"]


@pytest.fixture(scope="module")
def process_saver() -> Iterator[ProcessSaver]:
    """One writer process for the whole module (spawning costs about a second)."""
    saver = ProcessSaver(name="torchaux-test-process-writer")
    yield saver
    close_process_saver(saver)


@pytest.fixture
def saver_for(
    make_saver: Callable[..., AsyncSaver], process_saver: ProcessSaver
) -> Callable[[object], dict[str, Any]]:
    """``saver=`` kwargs for an async_save mode: the default saver for sync saves."""

    def get(mode: object) -> dict[str, Any]:
        if mode == "thread":
            return {"saver": make_saver()}
        if mode == "process":
            return {"saver": process_saver}
        return {}

    return get


def _append() -> dict[str, Any]:
    return {**APPEND_SCALARS, "extra": torch.arange(3, dtype=torch.int16)}


def _check_reference_reader(path: str, fmt: str, expected: dict[str, Any]) -> None:
    if fmt == "ckpt":
        assert_entries(torch.load(path, weights_only=True), expected)
        return
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert_entries(safetensors_torch.load_file(path), tensors)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    values = {k: v for k, v in expected.items() if not isinstance(v, torch.Tensor)}
    assert json.loads(metadata["torchaux.values"]) == values


@pytest.mark.parametrize("crc", [False, True], ids=["nocrc", "crc"])
@pytest.mark.parametrize("enc", ENCRYPTIONS, ids=ENCRYPTION_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_round_trip(
    tmp_path: Any,
    saver_for: Callable[[object], dict[str, Any]],
    mode: object,
    fmt: str,
    enc: tuple[str, bytes | None, str],
    crc: bool,
) -> None:
    """Loaded entries equal the saved ones bit for bit; 0o600; no plaintext in ciphertext."""
    _, key, enc_mode = enc
    state, append = sample_state(), _append()
    expected = expected_entries(state, append)
    path = os.path.join(os.path.realpath(tmp_path), f"model.{fmt}")

    handle = torchaux.save_checkpoint(
        state, path, async_save=mode, append_dict=append, enc_key=key, enc_mode=enc_mode,
        crc_check=crc, format=fmt, **saver_for(mode),
    )
    if mode is False:
        assert handle.done(), "a synchronous save returned before committing"
    assert handle.wait(WAIT_S) == path
    assert file_mode(path) == 0o600
    with open(path, "rb") as f:
        raw = f.read()
    assert (MARKER in raw) == (key is None), "plaintext tensor bytes visible" if key else "marker?"

    loaded = torchaux.load_checkpoint(path, dec_key=key, dec_mode=enc_mode, crc_check=crc)
    assert_entries(loaded, expected)
    if key is None:
        _check_reference_reader(path, fmt, expected)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)], "temp files left behind"


def _mutate(state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for t in state.values():
            if t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.fill_(3)


@pytest.mark.parametrize(
    "enc", [ENCRYPTIONS[0], ENCRYPTIONS[1], ENCRYPTIONS[-1]], ids=["plain", "AES-GCM", "SM4-CBC"]
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_thread_save_keeps_values_of_the_call(
    tmp_path: Any,
    make_saver: Callable[..., AsyncSaver],
    fmt: str,
    enc: tuple[str, bytes | None, str],
) -> None:
    """Tensors mutated right after a thread save returns: the file holds the old values."""
    _, key, enc_mode = enc
    sink = GatedSink()
    saver = make_saver(sink=sink)
    state = sample_state()
    expected = expected_entries(state, APPEND_SCALARS)
    path = str(tmp_path / "m.bin")
    handle = torchaux.save_checkpoint(
        state, path, async_save="thread", append_dict=dict(APPEND_SCALARS), enc_key=key,
        enc_mode=enc_mode, crc_check=True, format=fmt, saver=saver,
    )
    _mutate(state)
    assert sink.entered.wait(WAIT_S)
    assert not handle.done(), "the gate should hold the write"
    sink.release()
    handle.wait(WAIT_S)
    loaded = torchaux.load_checkpoint(path, dec_key=key, dec_mode=enc_mode, crc_check=True)
    assert_entries(loaded, expected)
    assert entries_mismatch(loaded, expected_entries(state, APPEND_SCALARS)) is not None


@pytest.mark.parametrize(
    "enc", [ENCRYPTIONS[0], ENCRYPTIONS[2], ENCRYPTIONS[4]], ids=["plain", "AES-GCM", "AES-CBC"]
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_process_save_keeps_values_of_the_call(
    tmp_path: Any, process_saver: ProcessSaver, fmt: str, enc: tuple[str, bytes | None, str]
) -> None:
    """Tensors mutated right after a process save returns: the file holds the old values."""
    _, key, enc_mode = enc
    state = sample_state()
    expected = expected_entries(state, APPEND_SCALARS)
    path = str(tmp_path / "m.bin")
    # Holding the lock that guards the child keeps the write from starting
    # until the tensors have been mutated.
    with process_saver._proc_lock:
        handle = torchaux.save_checkpoint(
            state, path, async_save="process", append_dict=dict(APPEND_SCALARS), enc_key=key,
            enc_mode=enc_mode, crc_check=True, format=fmt, saver=process_saver,
        )
        _mutate(state)
        assert not handle.done()
    handle.wait(WAIT_S)
    loaded = torchaux.load_checkpoint(path, dec_key=key, dec_mode=enc_mode, crc_check=True)
    assert_entries(loaded, expected)
    assert entries_mismatch(loaded, expected_entries(state, APPEND_SCALARS)) is not None


# -- validation before any I/O ------------------------------------------------------------

_T = torch.ones(2)

#: (id, save_obj, kwargs, expected error): every bad argument save_checkpoint must reject.
BAD_ARGUMENTS: list[tuple[str, Any, dict[str, Any], type]] = [
    ("format-pt", {"w": _T}, {"format": "pt"}, ValueError),
    ("format-upper", {"w": _T}, {"format": "CKPT"}, ValueError),
    ("format-none", {"w": _T}, {"format": None}, ValueError),
    ("save_obj-int", 1, {}, TypeError),
    ("save_obj-none", None, {}, TypeError),
    ("save_obj-str", "weights", {}, TypeError),
    ("save_obj-tensor", _T, {}, TypeError),
    ("save_obj-int-key", {1: _T}, {}, TypeError),
    ("save_obj-empty-name", {"": _T}, {}, ValueError),
    ("save_obj-object-value", {"w": object()}, {}, TypeError),
    ("save_obj-none-value", {"w": None}, {}, TypeError),
    ("save_obj-list-junk", [_T, 3], {}, TypeError),
    ("save_obj-dict-missing-data", [{"name": "w"}], {}, TypeError),
    ("save_obj-dict-extra-key", [{"name": "w", "data": _T, "x": 1}], {}, TypeError),
    ("save_obj-dict-int-name", [{"name": 1, "data": _T}], {}, TypeError),
    ("save_obj-dict-int-data", [{"name": "w", "data": 1}], {}, TypeError),
    ("save_obj-pair-int-name", [(1, _T)], {}, TypeError),
    ("integrated_save-int", {"w": _T}, {"integrated_save": 1}, TypeError),
    ("async-int", {"w": _T}, {"async_save": 1}, TypeError),
    ("async-none", {"w": _T}, {"async_save": None}, TypeError),
    ("async-str", {"w": _T}, {"async_save": "proc"}, ValueError),
    ("async-empty", {"w": _T}, {"async_save": ""}, ValueError),
    ("append-list", {"w": _T}, {"append_dict": [("epoch", 1)]}, TypeError),
    ("append-int-key", {"w": _T}, {"append_dict": {1: 2}}, TypeError),
    ("append-empty-key", {"w": _T}, {"append_dict": {"": 2}}, ValueError),
    ("append-none-value", {"w": _T}, {"append_dict": {"a": None}}, TypeError),
    ("append-list-value", {"w": _T}, {"append_dict": {"a": [1]}}, TypeError),
    ("append-bytes-value", {"w": _T}, {"append_dict": {"a": b"x"}}, TypeError),
    ("enc_key-str", {"w": _T}, {"enc_key": "0123456789abcdef"}, TypeError),
    ("enc_key-bytearray", {"w": _T}, {"enc_key": bytearray(16)}, TypeError),
    ("enc_key-int", {"w": _T}, {"enc_key": 16}, TypeError),
    ("enc_mode-unknown", {"w": _T}, {"enc_key": bytes(16), "enc_mode": "AES-CTR"}, ValueError),
    ("enc_mode-lower", {"w": _T}, {"enc_key": bytes(16), "enc_mode": "aes-gcm"}, ValueError),
    ("enc_mode-empty", {"w": _T}, {"enc_key": bytes(16), "enc_mode": ""}, ValueError),
    ("enc_mode-none", {"w": _T}, {"enc_mode": None}, TypeError),
    ("enc_mode-int-with-key", {"w": _T}, {"enc_key": bytes(16), "enc_mode": 1}, TypeError),
    ("choice_func-str", {"w": _T}, {"choice_func": "w"}, TypeError),
    ("crc-int", {"w": _T}, {"crc_check": 1}, TypeError),
    ("crc-str", {"w": _T}, {"crc_check": "yes"}, TypeError),
    ("crc-none", {"w": _T}, {"crc_check": None}, TypeError),
    ("kwarg-unknown", {"w": _T}, {"incremental": False}, TypeError),
    ("kwarg-typo", {"w": _T}, {"file_mod": 0o600}, TypeError),
    ("file_mode-negative", {"w": _T}, {"file_mode": -1}, ValueError),
    ("file_mode-too-big", {"w": _T}, {"file_mode": 0o1000}, ValueError),
    ("file_mode-str", {"w": _T}, {"file_mode": "0o600"}, ValueError),
    ("file_mode-float", {"w": _T}, {"file_mode": 384.0}, ValueError),
    ("file_mode-bool", {"w": _T}, {"file_mode": True}, ValueError),
    ("remove_redundancy-int", {"w": _T}, {"remove_redundancy": 1}, TypeError),
    ("saver-str", {"w": _T}, {"saver": "thread"}, TypeError),
    ("st-complex128", {"z": torch.zeros(2, dtype=torch.complex128)}, {"format": "safetensors"},
     ValueError),
    ("st-sparse", {"s": torch.eye(2).to_sparse()}, {"format": "safetensors"}, ValueError),
    ("st-metadata-name", {"__metadata__": _T}, {"format": "safetensors"}, ValueError),
]


@pytest.mark.parametrize(
    ("save_obj", "kwargs", "error"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_ARGUMENTS],
)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_bad_argument_rejected_before_io(
    tmp_path: Any,
    saver_for: Callable[[object], dict[str, Any]],
    mode: object,
    save_obj: Any,
    kwargs: dict[str, Any],
    error: type,
) -> None:
    """Every bad argument raises TypeError/ValueError at the call and creates no file."""
    kwargs = {"async_save": mode, **saver_for(mode), **kwargs}
    with pytest.raises(error):
        torchaux.save_checkpoint(save_obj, tmp_path / "m.ckpt", **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC", "SM4-CBC"])
def test_every_wrong_key_length_rejected(tmp_path: Any, mode: str) -> None:
    """Each mode accepts exactly its key lengths (AES 16/24/32, SM4 16); others fail before I/O."""
    allowed = {16} if mode == "SM4-CBC" else {16, 24, 32}
    for n in range(0, 65):
        path = tmp_path / f"{n}.ckpt"
        if n in allowed:
            torchaux.save_checkpoint({"w": _T}, path, enc_key=bytes(n), enc_mode=mode)
            continue
        with pytest.raises(ValueError, match="key"):
            torchaux.save_checkpoint({"w": _T}, path, enc_key=bytes(n), enc_mode=mode)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.ckpt" for n in allowed)


@pytest.mark.parametrize(
    ("target", "error"),
    [("missing/m.ckpt", ValueError), ("", ValueError), (".", ValueError), (1, TypeError),
     (None, TypeError), (b"m.ckpt", TypeError)],
    ids=["missing-dir", "empty", "directory", "int", "none", "bytes"],
)
def test_bad_target_rejected_before_io(tmp_path: Any, target: Any, error: type) -> None:
    """A missing directory, a directory or a non-path target raises before anything is written."""
    if isinstance(target, str) and target:
        target = os.path.join(tmp_path, target)
    with pytest.raises(error):
        torchaux.save_checkpoint({"w": _T}, target)
    assert os.listdir(tmp_path) == []


def test_bad_argument_fails_fast_while_saver_busy(
    tmp_path: Any, make_saver: Callable[..., AsyncSaver]
) -> None:
    """A bad argument raises at once even while the saver's only slot is taken (no waiting)."""
    sink = GatedSink()
    saver = make_saver(sink=sink, max_pending=1)
    handle = torchaux.save_checkpoint({"w": _T}, tmp_path / "a.ckpt", async_save=True, saver=saver)
    assert sink.entered.wait(WAIT_S)
    with pytest.raises(ValueError, match="key"):
        torchaux.save_checkpoint({"w": _T}, tmp_path / "b.ckpt", async_save=True, saver=saver,
                                 enc_key=bytes(5))
    sink.release()
    handle.wait(WAIT_S)
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_failed_validation_keeps_existing_file(tmp_path: Any) -> None:
    """A rejected save leaves an existing checkpoint at the target byte for byte."""
    path = tmp_path / "m.ckpt"
    torchaux.save_checkpoint({"w": _T}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        torchaux.save_checkpoint({"w": object()}, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_file_mode_kwarg(tmp_path: Any, mode: int) -> None:
    """file_mode sets the new file's permission bits, also when replacing a file."""
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    torchaux.save_checkpoint({"w": _T}, path, file_mode=mode)
    assert file_mode(path) == mode


@pytest.mark.parametrize("fail_after", [0, 50, 200, 600])
@pytest.mark.parametrize("enc", ENCRYPTIONS, ids=ENCRYPTION_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_write_failure_surfaces_and_keeps_old_file(
    tmp_path: Any,
    make_saver: Callable[..., AsyncSaver],
    fmt: str,
    enc: tuple[str, bytes | None, str],
    fail_after: int,
) -> None:
    """A disk error mid-write (also under encryption) is raised as itself; the old file survives."""
    _, key, enc_mode = enc
    path = tmp_path / "m.ckpt"
    torchaux.save_checkpoint({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    sink = FailingSink(fail_after=fail_after)
    saver = make_saver(sink=sink)
    handle = torchaux.save_checkpoint(
        sample_state(), path, async_save=True, enc_key=key, enc_mode=enc_mode, crc_check=True,
        format=fmt, saver=saver,
    )
    with pytest.raises(OSError) as info:
        handle.wait(WAIT_S)
    assert sink.raised and info.value is sink.raised[0]
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.ckpt"]
