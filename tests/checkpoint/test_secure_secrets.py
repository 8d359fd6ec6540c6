"""Keys never show in reprs, logs, exception texts or written files (security review, issue #16 item 3).

t_proc.py showed ``repr(WriteSpec)`` printing the key, and every job holding
a WriteSpec (the process saver's ``_Job``, a traceback's locals, a log line)
printed it with it.  These tests scan everything a save and a load expose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

import torchaux
from torchaux.checkpoint.engine import process_saver
from torchaux.checkpoint.engine.saver import AsyncSaver
from torchaux.checkpoint.save import WriteSpec
from torchaux.checkpoint.storage.commit import atomic_write

pytest.importorskip("cryptography")

KEY = b"KEYKEYKEYKEYKEYKEYKEYKEYKEYKEY!!"  # 32 bytes, distinctive in every encoding
OTHER = b"OTHEROTHEROTHEROTHEROTHEROTHER!!"


def _needles(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), repr(key).encode(), key[:12]]


def _assert_clean(text: str | bytes, what: str) -> None:
    blob = text.encode("utf-8", "backslashreplace") if isinstance(text, str) else text
    for key in (KEY, OTHER):
        for needle in _needles(key):
            assert needle not in blob, f"{what} shows the key ({needle[:8]!r}...)"


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


class _SpySaver(AsyncSaver):
    """Keeps every write callable it is given (what a log or traceback would show)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[Any] = []

    def submit(self, snapshot: Any, write: Any, target: str | None) -> Any:
        self.writes.append(write)
        return super().submit(snapshot, write, target)


def test_write_spec_repr_and_str_hide_the_key() -> None:
    spec = WriteSpec("ckpt", "/x.ckpt", atomic_write, KEY, "AES-GCM", False, [], {})
    for text in (repr(spec), str(spec), f"{spec}", f"{spec!r}"):
        _assert_clean(text, "WriteSpec")
        assert "256-bit key hidden" in text
    assert "enc_key=None" in repr(WriteSpec("ckpt", "/x", atomic_write, None, "AES-GCM", False, [], {}))
    # The process saver's job embeds the spec: its repr is clean too.
    job_type = getattr(process_saver, "Job", None) or getattr(process_saver, "_Job")
    job = job_type(spec, b"", [], {})
    _assert_clean(repr(job), "process saver job")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_save_and_load_expose_no_key(tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    """Reprs of specs and handles, every log record, every error and every file written."""
    caplog.set_level(logging.DEBUG)
    path = tmp_path / f"m.{fmt}"
    saver = _SpySaver()
    try:
        handle = torchaux.save_checkpoint(
            {"w": torch.ones(8)}, path, enc_key=KEY, format=fmt, crc_check=True, saver=saver,
            enc_aad="run/step-1",
        )
        handle.wait(60)
    finally:
        saver.close()
    for write in saver.writes:
        _assert_clean(repr(write) + str(write), "the write spec")
    _assert_clean(repr(handle), "the handle")
    torchaux.load_checkpoint(path, dec_key=KEY, crc_check=True, expected_id="run/step-1")
    failures: list[BaseException] = []
    for kwargs in (
        {"dec_key": OTHER},  # wrong key
        {"dec_key": KEY, "dec_mode": "AES-CBC"},  # wrong mode
        {"dec_key": KEY, "expected_id": "run/step-2"},  # swapped file
        {"dec_key": KEY[:16]},  # wrong length
        {},  # no key
    ):
        with pytest.raises(ValueError) as info:
            torchaux.load_checkpoint(path, **kwargs)
        failures.append(info.value)
    blob = bytearray(path.read_bytes())
    blob[200] ^= 1
    tampered = tmp_path / "tampered"
    tampered.write_bytes(bytes(blob))
    with pytest.raises(ValueError) as info:
        torchaux.load_checkpoint(tampered, dec_key=KEY)
    failures.append(info.value)
    with pytest.raises(ValueError) as info:
        torchaux.save_checkpoint({"w": torch.ones(2)}, tmp_path / "x", enc_key=KEY[:31])
    failures.append(info.value)
    for exc in failures:
        _assert_clean(_exception_text(exc), f"{type(exc).__name__}")
    for record in caplog.records:
        _assert_clean(record.getMessage() + repr(record.args), "a log record")
    for name in os.listdir(tmp_path):
        _assert_clean(name, "a file name")
        _assert_clean((tmp_path / name).read_bytes(), f"file {name}")


@contextlib.contextmanager
def _failing_sink(path: str) -> Iterator[BinaryIO]:
    with atomic_write(path) as f:
        yield f
        raise OSError("disk full (simulated)")


def test_background_failure_shows_no_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failed background save's exception (and its traceback) names no key."""
    caplog.set_level(logging.DEBUG)
    saver = AsyncSaver(sink=_failing_sink)
    try:
        handle = torchaux.save_checkpoint(
            {"w": torch.ones(4)}, tmp_path / "m.ckpt", enc_key=KEY, async_save=True, saver=saver
        )
        with pytest.raises(OSError) as info:
            handle.wait(60)
    finally:
        saver.close()
    _assert_clean(_exception_text(info.value), "the background failure")
    for record in caplog.records:
        _assert_clean(record.getMessage(), "a log record")


@pytest.mark.multiprocess
def test_process_saver_shows_no_key(tmp_path: Path) -> None:
    """t_proc.py: the writer process's argv/environment and the output file hold no key."""
    saver = process_saver.ProcessSaver()
    try:
        path = tmp_path / "p.ckpt"
        torchaux.save_checkpoint(
            {"w": torch.full((1000,), 7.0)}, path, async_save="process", enc_key=KEY, saver=saver
        ).wait(60)
        pid = saver._proc.pid
        for part in ("cmdline", "environ"):
            with contextlib.suppress(OSError):  # /proc is Linux-only
                _assert_clean(Path(f"/proc/{pid}/{part}").read_bytes(), f"child {part}")
        _assert_clean(path.read_bytes(), "the output file")
        _assert_clean(repr(saver), "the saver")
    finally:
        saver.close()
