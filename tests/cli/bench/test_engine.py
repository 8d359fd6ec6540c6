"""`python -m torchaux.cli.bench.engine`: writer CPU and first-save rows on a tiny state."""

from __future__ import annotations

import pathlib

import pytest

from torchaux.cli.bench import engine


def test_main_prints_every_row_and_cleans_up(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two writer-CPU rows, then a cold and a prepared first save; nothing is left in --dir."""
    assert engine.main(["--size-mib", "4", "--dir", str(tmp_path), "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "writer CPU, direct I/O", "writer CPU, buffered ", "first save cold pool    ",
        "first save after prepare",
    ]
    assert list(tmp_path.iterdir()) == []


def test_prepare_is_timed_only_when_asked(tmp_path: pathlib.Path) -> None:
    """The cold mode spends nothing in prepare; the prepared mode does."""
    cold = engine.first_save(4, str(tmp_path), prepare=False)
    warm = engine.first_save(4, str(tmp_path), prepare=True)
    assert cold["prepare_s"] < warm["prepare_s"]
    assert cold["first_s"] > 0 and warm["steady_s"] > 0
