"""Pending saves are finished at interpreter exit, and a failure then is reported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiprocess


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_unwaited_save_is_committed_before_exit(tmp_path: Path) -> None:
    """A script that exits right after save_async still leaves the complete file."""
    path = tmp_path / "exit.pt"
    proc = _run(f"""
        import torch, torchaux
        state = {{"w": torch.arange(16 << 20, dtype=torch.float32)}}
        torchaux.save_async(state, {str(path)!r})
    """)
    assert proc.returncode == 0, proc.stderr
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(16 << 20, dtype=torch.float32))


def test_failure_found_at_exit_is_logged(tmp_path: Path) -> None:
    """A save that fails after the script stopped looking is reported on stderr at exit."""
    proc = _run(f"""
        import contextlib, torch, torchaux

        @contextlib.contextmanager
        def broken_sink(path):
            raise OSError(28, "disk full (injected)")
            yield

        saver = torchaux.AsyncSaver(sink=broken_sink)
        torchaux.save_async(torch.ones(4), {str(tmp_path / "x.pt")!r}, saver=saver)
    """)
    assert "never waited for" in proc.stderr
    assert "disk full (injected)" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
