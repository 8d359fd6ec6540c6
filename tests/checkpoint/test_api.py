"""save_async's boundary: argument validation before any I/O, signature, re-exports."""

from __future__ import annotations

import inspect
import io
import os
import pathlib
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from compare import assert_identical, load
from sinks import WAIT_S, background

import torchaux
import torchaux.checkpoint
import torchaux.utils
from torchaux import AsyncSaver


def tree(root: pathlib.Path) -> list[tuple[str, int]]:
    """Every file and directory under root with its size (to prove nothing was written)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, root), os.path.getsize(full)))
    return sorted(out)


OBJ = {"w": torch.ones(3)}

# (id, build kwargs for save_async from tmp_path, expected exception, message regex)
Case = tuple[str, Callable[[pathlib.Path], dict[str, Any]], type[BaseException], str]
CASES: list[Case] = [
    ("int-target", lambda d: {"f": 123}, TypeError, r"path or a binary file-like object.*int"),
    ("none-target", lambda d: {"f": None}, TypeError, r"path or a binary file-like object.*NoneType"),
    ("bytes-target", lambda d: {"f": os.fsencode(d / "x.pt")}, TypeError, r"path or a binary file"),
    ("empty-path", lambda d: {"f": ""}, ValueError, r"file path"),
    ("directory", lambda d: {"f": d / "sub"}, ValueError, r"is a directory.*model\.pt"),
    ("missing-parent", lambda d: {"f": d / "nope" / "x.pt"}, ValueError, r"does not exist.*makedirs"),
    ("old-format", lambda d: {"f": d / "x.pt", "_use_new_zipfile_serialization": False}, RuntimeError,
     r"_use_new_zipfile_serialization=True"),
    ("protocol-str", lambda d: {"f": d / "x.pt", "pickle_protocol": "2"}, TypeError, r"pickle_protocol must be an int"),
    ("protocol-bool", lambda d: {"f": d / "x.pt", "pickle_protocol": True}, TypeError, r"pickle_protocol must be an int"),
    ("protocol-1", lambda d: {"f": d / "x.pt", "pickle_protocol": 1}, ValueError, r"between 2 and \d+.*got 1"),
    ("protocol-99", lambda d: {"f": d / "x.pt", "pickle_protocol": 99}, ValueError, r"between 2 and \d+.*got 99"),
    ("pickle-module", lambda d: {"f": d / "x.pt", "pickle_module": object()}, TypeError, r"Pickler"),
    ("byteorder-flag", lambda d: {"f": d / "x.pt", "_disable_byteorder_record": "yes"}, TypeError,
     r"_disable_byteorder_record must be a bool"),
    ("model-str", lambda d: {"f": d / "x.pt", "model": "x"}, TypeError, r"torch\.nn\.Module or None, got str"),
    ("saver-str", lambda d: {"f": d / "x.pt", "saver": "x"}, TypeError, r"AsyncSaver or None, got str"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_arguments_raise_before_any_io(saver: AsyncSaver, tmp_path: pathlib.Path, case: Case) -> None:
    """Each bad argument raises the documented type with a message naming what was expected; nothing is written."""
    _, build, exc_type, message = case
    (tmp_path / "sub").mkdir()
    before = tree(tmp_path)
    kwargs = build(tmp_path)
    kwargs.setdefault("saver", saver)
    f = kwargs.pop("f")
    with pytest.raises(exc_type, match=message):
        torchaux.save_async(OBJ, f, **kwargs)
    assert tree(tmp_path) == before
    assert saver.pool.cached_bytes() == 0


def test_text_mode_file_is_rejected(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """A file opened in text mode raises TypeError asking for mode 'wb'; nothing is written to it."""
    path = tmp_path / "x.pt"
    with open(path, "w") as f:
        with pytest.raises(TypeError, match=r"binary file object \(mode 'wb'\)"):
            torchaux.save_async(OBJ, f, saver=saver)
    assert tree(tmp_path) == [("x.pt", 0)]


def test_closed_file_is_rejected(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """A closed binary file raises ValueError saying it is closed."""
    path = tmp_path / "x.pt"
    f = open(path, "wb")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        torchaux.save_async(OBJ, f, saver=saver)
    assert tree(tmp_path) == [("x.pt", 0)]


def test_stringio_is_rejected_in_the_caller(saver: AsyncSaver) -> None:
    """A text buffer (io.StringIO) raises TypeError at the call, like a text-mode file."""
    try:
        handle = torchaux.save_async(OBJ, io.StringIO(), saver=saver)
    except TypeError as exc:
        assert "binary" in str(exc)
        return
    late = handle.exception(timeout=WAIT_S)  # observe it so the saver closes cleanly
    pytest.fail(f"StringIO accepted; the save failed later on the writer thread with {late!r}")


@pytest.mark.parametrize("make_obj", ["lambda", "local-class"])
def test_unpicklable_object_raises_in_the_caller(make_saver: Callable[..., AsyncSaver], tmp_path: pathlib.Path, make_obj: str) -> None:
    """An unpicklable object raises torch.save's exception type in the caller; nothing is written, no slot leaks."""

    class Local:
        pass

    bad = {"w": torch.ones(2), "fn": (lambda x: x) if make_obj == "lambda" else Local()}
    with pytest.raises(Exception) as reference:
        torch.save(bad, io.BytesIO())
    saver = make_saver(max_pending=1)
    with pytest.raises(type(reference.value)):
        torchaux.save_async(bad, tmp_path / "x.pt", saver=saver)
    assert os.listdir(tmp_path) == []
    assert saver.pool.cached_bytes() == 0
    # The only staging slot was given back: the next save does not block.
    nxt = background(torchaux.save_async, OBJ, tmp_path / "ok.pt", saver=saver)
    assert nxt.result(timeout=WAIT_S).wait(timeout=WAIT_S) == str(tmp_path / "ok.pt")
    assert_identical(load(str(tmp_path / "ok.pt")), OBJ)


def test_signature_is_torch_save_plus_model_and_saver() -> None:
    """save_async takes torch.save's parameters (same order and defaults), then model, then keyword-only saver."""
    ours = inspect.signature(torchaux.save_async).parameters
    theirs = inspect.signature(torch.save).parameters
    assert list(ours)[: len(theirs) + 2] == [*theirs, "model", "saver"]
    # Later options (storage_options for URLs, ...) are keyword-only, so no call changes meaning.
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(ours.values())[len(theirs) + 1:])
    for name, param in theirs.items():
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    assert ours["model"].default is None
    assert ours["saver"].default is None
    assert ours["saver"].kind is inspect.Parameter.KEYWORD_ONLY


def test_positional_arguments_like_torch_save(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """torch.save's positional call form works unchanged (pickle_module, protocol, flags)."""
    handle = torchaux.save_async(OBJ, tmp_path / "x.pt", pickle, 2, True, False, None, saver=saver)
    assert handle.wait(timeout=WAIT_S) == str(tmp_path / "x.pt")
    assert_identical(load(str(tmp_path / "x.pt")), OBJ)


def test_public_reexports() -> None:
    """torchaux.utils.save_async (torch_npu-style import) and torchaux.checkpoint expose the same function."""
    from torchaux.checkpoint.api import save_async

    assert torchaux.utils.save_async is torchaux.save_async
    assert torchaux.checkpoint.save_async is torchaux.save_async
    assert save_async is torchaux.save_async
    assert torchaux.checkpoint.wait_saves is torchaux.wait_saves
