"""Root fixtures shared by the doctests in src/ and the tests in tests/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import importlib.util

import pytest


def _missing(*modules: str) -> bool:
    for module in modules:
        try:
            if importlib.util.find_spec(module) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


# The framework drop-ins import their framework at import time; without it
# installed, their doctests cannot be collected (tests/integrations skip).
collect_ignore = [
    path for path, modules in (
        ("src/torchaux/integrations/lightning.py", ("lightning", "lightning_fabric")),
        ("src/torchaux/integrations/hf.py", ("transformers",)),
    ) if _missing(*modules)
]


@pytest.fixture(autouse=True)
def _doctest_tmp(doctest_namespace: dict[str, Any], tmp_path: Path) -> None:
    """Give every doctest a ``doctest_tmp`` directory (never the working directory)."""
    doctest_namespace["doctest_tmp"] = str(tmp_path)
