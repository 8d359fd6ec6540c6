"""Fixtures shared by the torchaux test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import sys
from pathlib import Path

import pytest

# The shared helpers of tests/checkpoint (compare, models, sinks, secure_helpers) are
# imported by name from the test modules in its sub-folders.
sys.path.insert(0, str(Path(__file__).resolve().parent / "checkpoint"))

# Helper modules of tests/checkpoint get pytest's assertion messages too.
pytest.register_assert_rewrite("compare", "sinks")

from torchaux import AsyncSaver  # noqa: E402
# The local S3 server (moto) and a fresh bucket per test, for the remote-storage tests.
from s3_server import s3_bucket, s3_endpoint  # noqa: E402,F401
from torchaux.checkpoint.engine import fence  # noqa: E402

#: Seconds a teardown waits for a saver to flush before the test errors out.
CLOSE_TIMEOUT_S = 60.0


def _close(saver: AsyncSaver) -> None:
    release = getattr(saver.sink, "release", None)
    if callable(release):  # never leave a writer thread stuck behind a test's gate
        release()
    saver.close(timeout=CLOSE_TIMEOUT_S)


@pytest.fixture
def saver() -> Iterator[AsyncSaver]:
    """A fresh AsyncSaver (real atomic sink) closed at teardown.

    Closing re-raises a failure the test left unobserved, so such a test
    errors instead of passing silently.
    """
    s = AsyncSaver(name="torchaux-test-writer")
    yield s
    _close(s)


@pytest.fixture
def make_saver() -> Iterator[Callable[..., AsyncSaver]]:
    """Factory for AsyncSavers with custom ``sink`` / ``max_pending``; all are closed at teardown."""
    made: list[AsyncSaver] = []

    def factory(**kwargs: Any) -> AsyncSaver:
        kwargs.setdefault("name", "torchaux-test-writer")
        s = AsyncSaver(**kwargs)
        made.append(s)
        return s

    yield factory
    errors = []
    for s in made:
        try:
            _close(s)
        except BaseException as exc:  # noqa: BLE001 - reported below, after closing all
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(autouse=True)
def _no_fence_left_armed() -> Iterator[None]:
    """Every test must leave no model fenced (a leaked fence would slow later tests)."""
    yield
    assert fence.armed_count() == 0, "a test left a save_async(model=...) fence armed"
