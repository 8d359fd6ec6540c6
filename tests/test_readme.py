"""Every Python example in README.md runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

import torchaux

_README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    """The README shows runnable Python examples (this suite would be empty otherwise)."""
    assert len(_BLOCKS) >= 3


def _s3_globals(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Any]:
    """KEY, SECRET, ENDPOINT of the local moto server, and its bucket ``bucket`` (emptied)."""
    from s3_server import FAKE_KEY, FAKE_SECRET, storage_options_for

    endpoint = request.getfixturevalue("s3_endpoint")
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options_for(endpoint))
    if fs.exists("bucket"):
        fs.rm("bucket", recursive=True)
    fs.mkdir("bucket")
    return {"KEY": FAKE_KEY, "SECRET": FAKE_SECRET, "ENDPOINT": endpoint}, fs


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_readme_example_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """README example number ``index`` runs without error in an empty directory."""
    block = _BLOCKS[index]
    # The framework drop-in examples need their framework (torchaux[lightning] / [hf]).
    for framework in ("lightning", "transformers", "accelerate"):
        if f"import {framework}" in block or f"from {framework}" in block:
            pytest.importorskip(framework, reason=f"{framework} not installed")
    # S3 examples use KEY/SECRET/ENDPOINT: here, those of the local moto server.
    names, fs = _s3_globals(request) if "ENDPOINT" in block else ({}, None)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md[python block {index}]", "exec"), dict(names))
    torchaux.wait_saves()
    if fs is not None:
        fs.invalidate_cache()
        assert fs.find("bucket"), "the S3 example wrote nothing"
        fs.rm("bucket", recursive=True)
    else:
        assert os.listdir(tmp_path) or "BytesIO" in block


def test_readme_first_commands_match_ci() -> None:
    """The README's test command is the one .ci/run executes."""
    commands = re.search(r"```bash\n(.*?)```", _README.read_text(), flags=re.S)
    assert commands is not None
    lines = commands.group(1).strip().splitlines()
    assert "torchaux bench" in lines[0]
    test_cmd = lines[1].split("&&")[-1].strip()
    ci = (_README.parent / ".ci" / "run").read_text()
    assert test_cmd in ci
