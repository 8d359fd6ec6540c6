"""Mechanical house rules: module size, __init__ purity, public surface pinned."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import torchaux

_SRC = Path(torchaux.__file__).resolve().parent

# The public surface; a change here is an API change and shows up in review.
_PUBLIC = {
    "save_async", "wait_saves", "AsyncSaver", "SaveHandle",
    "save_checkpoint", "load_checkpoint", "load_param_into_net", "load", "CheckpointManager",
    "CheckpointError", "IntegrityError", "DecryptionError", "UnsupportedFormatError",
    "SaveClosedError",
    "combine_tensors", "npu_combine_tensors", "get_part_combined_tensor",
    "is_combined_tensor_valid", "FlopsCounter", "FlopsBreakdown", "mfu",
    "set_thread_affinity", "reset_thread_affinity", "thread_affinity",
    "save_graph_tensor", "save_npugraph_tensor",
}


# The sorted __all__ of each public module: names may be added in review, never moved or lost.
_PUBLIC_MODULES = {
    "torchaux": sorted(_PUBLIC),
    "torchaux.utils": [
        "FlopsCounter", "get_part_combined_tensor", "is_combined_tensor_valid",
        "npu_combine_tensors", "reset_thread_affinity", "save_async", "set_thread_affinity",
    ],
    "torchaux.checkpoint": ["AsyncSaver", "SaveHandle", "save_async", "wait_saves"],
    "torchaux.training": [
        "FlopsBreakdown", "FlopsCounter", "available_cores", "combine_tensors",
        "cores_excluding", "get_part_combined_tensor", "get_storage_size",
        "get_thread_affinity", "is_combined_tensor_valid", "mfu", "npu_combine_tensors",
        "reset_thread_affinity", "save_graph_tensor", "save_npugraph_tensor",
        "set_thread_affinity", "thread_affinity",
    ],
}

#: Most modules one folder may hold before it should be split into packages.
_MAX_MODULES_PER_FOLDER = 10


def _modules() -> list[Path]:
    return sorted(_SRC.rglob("*.py"))


def test_modules_stay_under_400_lines() -> None:
    """Every source module is under ~400 lines (split by concept when it grows)."""
    too_long = {str(p.relative_to(_SRC)): n for p in _modules()
                if (n := len(p.read_text().splitlines())) > 410}
    assert too_long == {}


def test_init_files_only_reexport() -> None:
    """__init__.py files define no functions or classes."""
    offenders = []
    for p in _SRC.rglob("__init__.py"):
        tree = ast.parse(p.read_text())
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in tree.body):
            offenders.append(str(p.relative_to(_SRC)))
    assert offenders == []


def test_public_surface_is_pinned() -> None:
    """torchaux.__all__ is exactly the reviewed public API, and every name resolves."""
    assert set(torchaux.__all__) == _PUBLIC
    assert all(hasattr(torchaux, name) for name in torchaux.__all__)


def test_no_blanket_silent_except() -> None:
    """No `except Exception: pass` (or bare except) swallows errors anywhere in src/."""
    offenders = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ExceptHandler):
                blanket = node.type is None or (
                    isinstance(node.type, ast.Name) and node.type.id in {"Exception", "BaseException"}
                )
                if blanket and all(isinstance(s, ast.Pass) for s in node.body):
                    offenders.append(f"{p.relative_to(_SRC)}:{node.lineno}")
    assert offenders == []


def test_torch_npu_utils_mirror() -> None:
    """torchaux.utils exposes torch_npu.utils' names, as the same objects."""
    import torchaux.utils as utils

    for name in utils.__all__:
        assert getattr(utils, name) is getattr(torchaux, name)


@pytest.mark.parametrize("module", sorted(_PUBLIC_MODULES))
def test_public_modules_all_is_pinned(module: str) -> None:
    """Each public module's sorted __all__ is the reviewed list, and every name resolves."""
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == _PUBLIC_MODULES[module]
    assert all(hasattr(mod, name) for name in mod.__all__)


def _folders() -> dict[Path, list[str]]:
    folders: dict[Path, list[str]] = {}
    for p in _modules():
        if p.name not in ("__init__.py", "__main__.py"):
            folders.setdefault(p.parent, []).append(p.stem)
    return folders


def test_no_folder_holds_more_than_ten_modules() -> None:
    """A folder that grows past ~10 modules is split into packages named after the layers."""
    crowded = {str(d.relative_to(_SRC)): len(m) for d, m in _folders().items()
               if len(m) > _MAX_MODULES_PER_FOLDER}
    assert crowded == {}


def test_no_shared_name_prefix_where_a_package_would_do() -> None:
    """Two sibling modules named `<prefix>_...` (or `x` and `x_...`) are a package not yet made."""
    offenders = []
    for folder, stems in _folders().items():
        by_prefix: dict[str, list[str]] = {}
        for stem in stems:
            by_prefix.setdefault(stem.lstrip("_").split("_")[0], []).append(stem)
        offenders += [f"{folder.relative_to(_SRC)}: {sorted(group)}"
                      for group in by_prefix.values() if len(group) > 1]
    assert offenders == []
