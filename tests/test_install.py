"""What a new user's install gives: declared dependencies and a quiet import."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata


def test_numpy_is_a_declared_dependency() -> None:
    """torch warns 'Failed to initialize NumPy' at import without numpy, so torchaux requires it."""
    requires = [r.split(";")[0].strip() for r in metadata.requires("torchaux") or []]
    assert "numpy" in requires
    assert "torch" in requires


def test_import_and_bench_help_print_no_warning() -> None:
    """Importing torchaux and starting the CLI prints nothing on stderr (no NumPy warning)."""
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c",
         "import torchaux; from torchaux.cli.main import main; main(['bench', '--help'])"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NumPy" not in proc.stderr
    assert proc.stderr == ""
