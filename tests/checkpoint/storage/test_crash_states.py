"""Every state a power loss could leave during a save holds the old checkpoint or the new one.

Each save path's file-system calls are recorded (tests/checkpoint/fsrecord.py)
and every crash state the persistence model allows is rebuilt and checked:
the target path holds exactly the previous file's bytes or exactly the new
file's bytes (or nothing, when there was no previous file) — never a mixture,
never a zero-length or truncated file.  A commit without fsync is the
negative control: the explorer must find torn states there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fsrecord import Recorder, Tree, explore

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.storage.commit import TEMP_MARKER

KEY = bytes(range(32))

#: save path -> (file name, function(state, path) that saves and waits).
PATHS: dict[str, tuple[str, Callable[[dict, str], None]]] = {
    "save_async": ("model.pt", lambda s, p: torchaux.save_async(s, p).wait()),
    "save_checkpoint ckpt+CRC": ("model.ckpt", lambda s, p: torchaux.save_checkpoint(
        s, p, crc_check=True)),
    "save_checkpoint safetensors+CRC": ("model.safetensors", lambda s, p: torchaux.save_checkpoint(
        s, p, format="safetensors", crc_check=True)),
    "save_checkpoint AES-GCM ckpt": ("model.ckpt", lambda s, p: torchaux.save_checkpoint(
        s, p, enc_key=KEY, enc_mode="AES-GCM", crc_check=True)),
    "save_checkpoint AES-CBC safetensors": ("model.safetensors", lambda s, p: torchaux.save_checkpoint(
        s, p, format="safetensors", enc_key=KEY, enc_mode="AES-CBC")),
    "save_checkpoint thread": ("model.ckpt", lambda s, p: torchaux.save_checkpoint(
        s, p, async_save="thread").wait()),
}

# Writes per save are kept small by tiny buffers, so every combination of
# lost, whole and partial writes can be enumerated (the bar: a save
# of 3 file writes explored completely).
_SMALL = {"write_buffer_bytes": 4096, "direct_io_buffer_bytes": 4096,
          "encryption_chunk_bytes": 4096}


def _state(step: int) -> dict:
    return {"w": torch.full((3000,), float(step)), "b": torch.full((1500,), -float(step)),
            "step": torch.tensor(step)}


def _record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str,
            *, old: bool, direct: bool, fsync: bool = True) -> tuple[Tree, list, bytes, str]:
    d = tmp_path / "ckpt"
    d.mkdir()
    name, save = PATHS[which]
    path = str(d / name)
    with _knobs.override(**_SMALL, direct_io=int(direct)):
        if old:
            save(_state(1), path)
        rec = Recorder(str(d))
        with _knobs.override(fsync=int(fsync)), rec.active(monkeypatch):
            save(_state(2), path)
    rec.verify()
    return rec.initial, rec.ops, (d / name).read_bytes(), name


def _torn(before: Tree, ops: list, new: bytes, name: str, order: str = "ordered"
          ) -> tuple[int, list]:
    """(states explored, states where ``name`` is neither old nor new)."""
    old = [s for p, s in explore(before, [])][0]
    allowed = {new, old.get(name)}
    n, bad = 0, []
    for point, state in explore(before, ops, order=order):
        n += 1
        extra = [k for k in state if k != name and TEMP_MARKER not in k]
        if state.get(name) not in allowed or extra:
            bad.append((point, len(state.get(name) or b""), extra))
    return n, bad


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
@pytest.mark.parametrize("old", [True, False], ids=["overwrite", "first-save"])
@pytest.mark.parametrize("which", sorted(PATHS))
def test_every_crash_state_holds_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, old: bool, direct: bool
) -> None:
    """All crash states of the save (lost, whole, partial and reordered writes; cut dir ops)."""
    before, ops, new, name = _record(tmp_path, monkeypatch, which, old=old, direct=direct)
    kinds = [op[0] for op in ops]
    assert kinds.count("write") >= 3, kinds  # the bar: at least a 3-write save, explored fully
    assert "fsync" in kinds and "rename" in kinds and kinds[-1] == "fsync_dir", kinds
    for order in ("ordered", "any"):
        n, bad = _torn(before, ops, new, name, order)
        assert n > len(ops)  # more states than crash points: partial and lost writes are built
        assert bad == [], order


@pytest.mark.parametrize("which", ["save_async", "save_checkpoint AES-GCM ckpt"])
def test_negative_control_commit_without_fsync_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """A rename not preceded by fsync (TORCHAUX_FSYNC=0) leaves torn states: the explorer sees them.

    This is also why docs/RELIABILITY.md says fsync=0 is atomic against a
    process crash but not against a power loss.
    """
    before, ops, new, name = _record(tmp_path, monkeypatch, which, old=True, direct=False,
                                     fsync=False)
    assert "fsync" not in [op[0] for op in ops]
    _, bad = _torn(before, ops, new, name)
    assert bad, "the explorer missed the torn states of a commit without fsync"
    assert any(size < len(new) for _, size, _ in bad)  # truncated or empty files among them


def test_recorder_sees_direct_and_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorded writes rebuild the committed file byte for byte (recording loses nothing)."""
    for direct in (True, False):
        sub = tmp_path / str(direct)
        sub.mkdir()
        before, ops, new, name = _record(sub, monkeypatch, "save_async", old=False,
                                         direct=direct)
        final = [s for p, s in explore(before, ops) if p == len(ops)]
        assert {s[name] for s in final} == {new}
        assert torch.load(sub / "ckpt" / name, weights_only=True)["step"] == 2
