"""The README's manager example resumes: run twice in one directory, the second run continues."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import torchaux

_README = Path(__file__).resolve().parents[2] / "README.md"


def _manager_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _README.read_text(), flags=re.S)
    found = [b for b in blocks if "CheckpointManager(" in b]
    assert found, "README shows no CheckpointManager example"
    return found[0]


def test_readme_manager_example_saves_keeps_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(_manager_example(), "README.md[manager example]", "exec")
    first: dict[str, object] = {}
    exec(code, first)
    mgr = torchaux.CheckpointManager("ckpts", best_fn="loss")
    steps = mgr.all_steps()
    # Saved 0, 50, 100, 150; kept the latest 3 plus the best by loss.
    assert steps[-3:] == [50, 100, 150] and len(steps) <= 4
    assert mgr.best_step() in steps
    saved = mgr.restore(150)
    mgr.close()
    second: dict[str, object] = {}
    exec(code, second)
    assert second["start"] == 151  # resumed after the newest committed step
    model = torch.nn.Linear(8, 8)
    model.load_state_dict(saved["model"])  # the saved state is a loadable state_dict
    assert saved["opt"]["state"], "the optimizer's momentum buffers were saved"
