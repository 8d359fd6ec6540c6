"""Root fixtures shared by the doctests in src/ and the tests in tests/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _doctest_tmp(doctest_namespace: dict[str, Any], tmp_path: Path) -> None:
    """Give every doctest a ``doctest_tmp`` directory (never the working directory)."""
    doctest_namespace["doctest_tmp"] = str(tmp_path)
