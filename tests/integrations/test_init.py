"""The core import never imports a training framework."""

from __future__ import annotations

import subprocess
import sys


def test_import_torchaux_imports_no_framework() -> None:
    """`import torchaux` and `import torchaux.integrations` leave lightning and transformers unimported."""
    code = (
        "import sys, torchaux, torchaux.integrations, torchaux.cli.main\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'lightning_fabric', "
        "'transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_accelerate_module_imports_accelerate_only_when_used() -> None:
    """torchaux.integrations.accelerate (and staged_files) import no framework until a function is called."""
    code = (
        "import sys, torchaux.integrations.accelerate, torchaux.integrations.staged_files\n"
        "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
