"""The framework tests' shared setup.

``Trainer.train`` (through accelerate's ``free_memory``) and Lightning call
``gc.collect()`` several times per run; in the full suite the heap holds
every earlier test's objects, and each full collection walked all of them
(seconds per Trainer run in CI).  The heap as it is when these tests start
is frozen (``gc.freeze``: moved to a generation the collector skips), so a
collection here scans only what these tests allocate.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="package")
def _frozen_heap() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
