"""resolve_group: which process group a CheckpointManager saves with (tests src/torchaux/manager/group.py).

The agreement itself runs on spawned ranks in test_sharded.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import torchaux
from torchaux.manager.group import resolve_group


def test_one_process_without_an_initialised_group(tmp_path: Path) -> None:
    assert resolve_group(None) is None and resolve_group(False) is None
    with torchaux.CheckpointManager(tmp_path / "run", process_group=False) as mgr:
        assert mgr._sharded is None


def test_process_group_argument_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not initialised"):
        torchaux.CheckpointManager(tmp_path / "run", process_group=True)
    with pytest.raises(TypeError, match="ProcessGroup"):
        torchaux.CheckpointManager(tmp_path / "run", process_group="world")
