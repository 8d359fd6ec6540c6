"""Shared data and helpers for the save_checkpoint / load_checkpoint tests.

Imported like ``sinks`` and ``compare`` (tests/checkpoint is on ``sys.path``
under pytest's default import mode).  Everything here is small, CPU-only and
deterministic.  The sinks defined here are picklable, so a
:class:`~torchaux.checkpoint.engine.process_saver.ProcessSaver` can run them in its
writer process.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import torch

from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.checkpoint.engine.process_saver import ProcessSaver

#: Upper bound for any wait in a test; a hang becomes a clear failure.
WAIT_S = 60.0

#: (test id, enc_key, enc_mode): every mode and key length, and no encryption.
ENCRYPTIONS: list[tuple[str, bytes | None, str]] = [
    ("plain", None, "AES-GCM"),
    ("AES-GCM-16", bytes(range(16)), "AES-GCM"),
    ("AES-GCM-24", bytes(range(24)), "AES-GCM"),
    ("AES-GCM-32", bytes(range(32)), "AES-GCM"),
    ("AES-CBC-16", bytes(range(100, 116)), "AES-CBC"),
    ("AES-CBC-32", bytes(range(100, 132)), "AES-CBC"),
    ("SM4-CBC-16", bytes(range(200, 216)), "SM4-CBC"),
]
ENCRYPTION_IDS = [e[0] for e in ENCRYPTIONS]
FORMATS = ["ckpt", "safetensors"]

#: 48 bytes no checkpoint writes by itself: if a file contains them, it holds
#: the plaintext of the ``marker`` tensor.
MARKER = bytes(torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(20240601),
                             dtype=torch.uint8).tolist())

#: Non-tensor append_dict entries: every scalar type, with values a wrong
#: type conversion would change (bool vs int, float vs int, non-ASCII str).
APPEND_SCALARS: dict[str, Any] = {"epoch": 7, "lr": 0.125, "flag": True, "tag": "run-\u03b1/7"}


def sample_state() -> dict[str, torch.Tensor]:
    """Tiny named tensors: several dtypes, a 0-d and an empty tensor, a view, the marker."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(4, 3, generator=gen)
    return {
        "conv.weight": torch.randn(2, 3, generator=gen),
        "conv.bias": torch.randn(2, generator=gen, dtype=torch.float64),
        "emb.half": torch.randn(3, generator=gen).to(torch.float16),
        "emb.bf16": torch.randn(3, generator=gen).to(torch.bfloat16),
        "steps": torch.tensor([1, -2, 3], dtype=torch.int64),
        "ids": torch.tensor([[5, 6]], dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "view.t": base.t(),
        "marker": torch.tensor(list(MARKER), dtype=torch.uint8),
    }


def expected_entries(
    state: Mapping[str, Any], append: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a load must return: deep copies of ``state`` entries, then ``append``."""
    out = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    for k, v in (append or {}).items():
        out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The C-order bytes of ``t``'s values (any dtype, any layout)."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def entries_mismatch(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """None if equal (keys; tensors by dtype, shape and bytes; scalars by type and value)."""
    if set(actual) != set(expected):
        return f"keys differ: missing {sorted(set(expected) - set(actual))}, " \
               f"extra {sorted(set(actual) - set(expected))}"
    for k, want in expected.items():
        got = actual[k]
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return f"{k!r}: expected a tensor, got {type(got).__name__}"
            if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
                return f"{k!r}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
            if got.device.type != "cpu":
                return f"{k!r}: loaded on {got.device}, expected cpu"
            if tensor_bytes(got) != tensor_bytes(want):
                return f"{k!r}: values differ"
        elif type(got) is not type(want) or got != want:
            return f"{k!r}: {got!r} ({type(got).__name__}) != {want!r} ({type(want).__name__})"
    return None


def assert_entries(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise AssertionError naming the first difference between two loaded dicts."""
    problem = entries_mismatch(actual, expected)
    if problem is not None:
        raise AssertionError(problem)


def file_mode(path: str | os.PathLike[str]) -> int:
    """Permission bits of ``path``."""
    return os.stat(path).st_mode & 0o777


def close_process_saver(saver: ProcessSaver) -> None:
    """Close ``saver``; if its child is already gone, still end it and free everything.

    Used by fixtures, so that a test exposing a ``close()`` bug does not leak
    a process or shared-memory segments into later tests.
    """
    try:
        saver.close(timeout=WAIT_S)
    except OSError:
        # The child died under us (tests kill it on purpose); close() may then
        # fail to send its stop message.  Finish the cleanup it skipped.
        with saver._proc_lock:
            proc, conn = saver._proc, saver._conn
            saver._proc = saver._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(WAIT_S)
        saver.pool.clear()


class PidSink:
    """Picklable sink that records the pid of the process writing the file.

    The pid goes to ``<path>.pid`` after the commit; the file itself goes
    through the real :func:`atomic_write`.
    """

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        with atomic_write(path, mode=0o600) as f:
            yield f
        with open(path + ".pid", "w") as f:
            f.write(str(os.getpid()))


class NoSpaceSink:
    """Picklable sink that fails every save with ENOSPC before writing a byte."""

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        raise OSError(errno.ENOSPC, "No space left on device (injected by NoSpaceSink)", path)
        yield  # pragma: no cover - makes this a generator


class _Unpicklable(Exception):
    """An exception whose pickling fails (it holds a lambda)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None


class UnpicklableErrorSink:
    """Picklable sink whose failure cannot be pickled back to the parent."""

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        raise _Unpicklable("writer failed with an exception that does not pickle")
        yield  # pragma: no cover - makes this a generator


class FifoGateSink:
    """Picklable sink that holds a save inside the writer until the test lets it go.

    Inside :func:`atomic_write` (the temp file exists), it writes a line to the
    FIFO ``entered`` (the test's read of it returns once the writer is there),
    then blocks reading the FIFO ``gate`` until the test opens it for writing.
    Works across processes, with no sleeps.
    """

    def __init__(self, entered: str, gate: str) -> None:
        self.entered = entered
        self.gate = gate

    @contextlib.contextmanager
    def __call__(self, path: str) -> Iterator[BinaryIO]:
        with atomic_write(path, mode=0o600) as f:
            with open(self.entered, "w") as fifo:
                fifo.write(f"{os.getpid()}\n")
            with open(self.gate) as fifo:
                fifo.read()
            yield f
