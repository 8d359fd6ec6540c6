"""Every Python example in README.md runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import torchaux

_README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    """The README shows runnable Python examples (this suite would be empty otherwise)."""
    assert len(_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README example number ``index`` runs without error in an empty directory."""
    # The framework drop-in examples need their framework (torchaux[lightning] / [hf]).
    for framework in ("lightning", "transformers"):
        if f"import {framework}" in _BLOCKS[index] or f"from {framework}" in _BLOCKS[index]:
            pytest.importorskip(framework, reason=f"{framework} not installed")
    monkeypatch.chdir(tmp_path)
    exec(compile(_BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    torchaux.wait_saves()
    assert os.listdir(tmp_path) or "BytesIO" in _BLOCKS[index]


def test_readme_first_commands_match_ci() -> None:
    """The README's test command is the one .ci/run executes."""
    commands = re.search(r"```bash\n(.*?)```", _README.read_text(), flags=re.S)
    assert commands is not None
    lines = commands.group(1).strip().splitlines()
    assert "torchaux bench" in lines[0]
    test_cmd = lines[1].split("&&")[-1].strip()
    ci = (_README.parent / ".ci" / "run").read_text()
    assert test_cmd in ci
