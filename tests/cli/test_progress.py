"""Progress bars of inspect/verify/convert: drawn by tqdm, and optional."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.cli.main import main
from torchaux.cli.progress import Progress, tqdm_available

_MIB = 1 << 20


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 64 MiB checkpoint with a CRC: the size from which a bar is worth drawing."""
    path = str(tmp_path_factory.mktemp("progress") / "big.ckpt")
    torchaux.save_checkpoint({"w": torch.ones(16 * _MIB)}, path, crc_check=True)
    return path


def _commands(big_file: str, tmp_path: Path) -> list[list[str]]:
    return [
        ["inspect", big_file],
        ["verify", big_file, "--require-crc"],
        ["convert", big_file, str(tmp_path / "out.safetensors"), "--format", "safetensors"],
    ]


@pytest.mark.skipif(not tqdm_available(), reason="tqdm is not installed")
@pytest.mark.parametrize("which", [0, 1, 2], ids=["inspect", "verify", "convert"])
def test_tqdm_bar_with_progress_on_a_64_mib_file(
    big_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], which: int
) -> None:
    """--progress draws tqdm's bar (percentage, bar, sizes in binary units, rate) to 100%."""
    argv = _commands(big_file, tmp_path)[which]
    assert main([*argv, "--progress"]) == 0
    err = capsys.readouterr().err
    last = err.rstrip("\n").rsplit("\r", 1)[-1]
    assert "100%|" in last and "64.0M/64.0M" in last and "B/s]" in last, err


@pytest.mark.parametrize("which", [0, 1, 2], ids=["inspect", "verify", "convert"])
def test_commands_work_without_tqdm(
    big_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, which: int,
) -> None:
    """With tqdm hidden (import fails), --progress draws nothing and the command succeeds."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert not tqdm_available()
    argv = _commands(big_file, tmp_path)[which]
    assert main([*argv, "--progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out  # the report / OK line is still printed


def test_disabled_bar_counts_without_drawing() -> None:
    """A disabled bar never constructs tqdm, but still counts bytes (the writers rely on it)."""
    bar = Progress("x", 10, enabled=False)
    bar.update(4)
    bar.close()
    assert bar.done == 4


@pytest.mark.skipif(not tqdm_available(), reason="tqdm is not installed")
def test_estimated_total_grows_instead_of_passing_100_percent() -> None:
    """A write whose size was an estimate ends at 100%, not 150%."""
    import io

    out = io.StringIO()
    with Progress("w", 2 * _MIB, enabled=True, stream=out) as bar:
        bar.update(3 * _MIB)
    last = out.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert "100%|" in last and "3.00M/3.00M" in last, last
