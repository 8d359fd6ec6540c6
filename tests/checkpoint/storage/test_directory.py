"""Publishing and removing whole checkpoint folders (storage/directory.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torchaux.checkpoint.storage.directory import OLD_MARKER, publish_directory, remove_stale, remove_tree


def _fill(folder: Path, content: bytes) -> None:
    folder.mkdir()
    (folder / "model.bin").write_bytes(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "x").write_bytes(content)


def test_publish_renames_the_whole_folder(tmp_path: Path) -> None:
    """The staged folder appears under the final name with all its files; the staging name is gone."""
    _fill(tmp_path / "tmp-checkpoint-2", b"new")
    out = publish_directory(str(tmp_path / "tmp-checkpoint-2"), str(tmp_path / "checkpoint-2"))
    assert out == str(tmp_path / "checkpoint-2")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "sub" / "x").read_bytes() == b"new"


def test_publish_replaces_an_existing_folder(tmp_path: Path) -> None:
    """A step saved again replaces the old folder; nothing aside is left behind."""
    _fill(tmp_path / "checkpoint-2", b"old")
    _fill(tmp_path / "tmp-checkpoint-2", b"new")
    publish_directory(str(tmp_path / "tmp-checkpoint-2"), str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "model.bin").read_bytes() == b"new"


def test_publish_refuses_other_directories_and_missing_staging(tmp_path: Path) -> None:
    """A rename across directories (maybe across file systems) is refused before any change."""
    (tmp_path / "a").mkdir()
    _fill(tmp_path / "a" / "tmp", b"x")
    with pytest.raises(ValueError, match="same directory"):
        publish_directory(str(tmp_path / "a" / "tmp"), str(tmp_path / "checkpoint-1"))
    with pytest.raises(FileNotFoundError):
        publish_directory(str(tmp_path / "nothing"), str(tmp_path / "checkpoint-1"))
    assert (tmp_path / "a" / "tmp" / "model.bin").exists()


def test_remove_tree_and_stale(tmp_path: Path) -> None:
    """remove_tree deletes folders and files (missing is fine); remove_stale takes only what it is told."""
    _fill(tmp_path / "checkpoint-1", b"x")
    _fill(tmp_path / "tmp-checkpoint-3", b"x")
    (tmp_path / f".checkpoint-1{OLD_MARKER}ab").mkdir()
    (tmp_path / "notes.txt").write_text("keep")
    removed = remove_stale(str(tmp_path), ["tmp-checkpoint-3"])
    assert sorted(os.path.basename(p) for p in removed) == [f".checkpoint-1{OLD_MARKER}ab", "tmp-checkpoint-3"]
    remove_tree(str(tmp_path / "checkpoint-1"))
    remove_tree(str(tmp_path / "missing"))
    remove_tree(str(tmp_path / "notes.txt"))
    assert os.listdir(tmp_path) == []
