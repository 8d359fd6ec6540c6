"""Disk faults at every operation of every save path: the error reaches the caller, nothing is lost.

ENOSPC, EIO and EDQUOT are injected at the k-th write (k over every write of
the save), at the file fsync, at the rename and at the directory fsync.  In
every cell: the save raises (through ``handle.wait()`` for background saves),
the previous checkpoint still loads with its old bytes (after a failed
directory fsync the rename has happened, so the target holds the new file,
complete), no temp file remains, and the next save on the same path works.
A failed fsync is final: the save is not retried into a reported success
(after fsyncgate: a failed fsync may have dropped the dirty pages).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fsrecord import Recorder, errno_of
from test_crash_states import _SMALL, KEY, PATHS, _state

import torchaux

from torchaux import _knobs
from torchaux.checkpoint.storage.commit import TEMP_MARKER

ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EDQUOT": errno.EDQUOT}
OPS = ("create", "write", "fsync", "rename", "fsync_dir")


def _counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, direct: bool) -> dict:
    """Operations of each kind in one clean save of this path (the matrix's k range)."""
    d = tmp_path / "probe"
    d.mkdir()
    name, save = PATHS[which]
    rec = Recorder(str(d))
    with _knobs.override(**_SMALL, direct_io=int(direct)), rec.active(monkeypatch):
        save(_state(0), str(d / name))
    return {kind: sum(op[0] == kind for op in rec.ops) for kind in OPS}


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
@pytest.mark.parametrize("err", sorted(ERRNOS))
@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("which", sorted(PATHS))
def test_fault_at_every_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, kind: str, err: str, direct: bool,
) -> None:
    """Each k-th operation of this kind fails in turn; every outcome is clean."""
    count = _counts(tmp_path, monkeypatch, which, direct)[kind]
    assert count >= 1, f"{which} performed no {kind}"
    name, save = PATHS[which]
    for k in range(1, count + 1):
        d = tmp_path / f"{kind}-{k}"
        d.mkdir()
        path = str(d / name)
        with _knobs.override(**_SMALL, direct_io=int(direct)):
            save(_state(1), path)
            old = Path(path).read_bytes()
            rec = Recorder(str(d), fail={kind: (k, ERRNOS[err])})
            with rec.active(monkeypatch), pytest.raises(OSError) as info:
                save(_state(2), path)
            assert rec.injected == [(kind, ERRNOS[err])]
            assert errno_of(info.value) == ERRNOS[err], repr(info.value)
            fsyncs = [op for op in rec.ops if op[0] == "fsync"]
            if kind == "fsync":
                assert fsyncs == [], "a failed fsync was retried"
            leftovers = [n for n in os.listdir(d) if TEMP_MARKER in n]
            assert leftovers == []
            after = Path(path).read_bytes()
            if kind == "fsync_dir":  # the rename happened: the new file, complete
                assert int(_load(which, path)["step"]) == 2
                assert after != old
            else:
                assert after == old
            save(_state(3), path)  # the path (and the saver) keep working
        assert Path(path).read_bytes() != old


def _load(which: str, path: str) -> dict:
    key = KEY if "AES" in which else None
    return torchaux.load_checkpoint(path, dec_key=key, dec_mode="AES-CBC" if "CBC" in which else "AES-GCM")
