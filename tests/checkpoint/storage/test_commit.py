"""atomic_write: durability order, clean failure, stale-temp cleanup, fsync knob."""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator

import pytest

from torchaux import _knobs
from torchaux.checkpoint.storage import commit as atomic
from torchaux.checkpoint.storage.commit import TEMP_MARKER, atomic_write, remove_stale_temps, temp_path_for

PAYLOAD = b"new content " * 1000


class Recorder:
    """Stands in for os.fsync / os.replace and logs (what, inode, size) in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, ...]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            kind = "fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file"
            self.calls.append((kind, str(st.st_ino), str(st.st_size)))
            real_fsync(fd)

        def replace(src: str, dst: str) -> None:
            self.calls.append(("replace", src, dst))
            real_replace(src, dst)

        # commit.py uses the os module itself; patch the attributes it looks up.
        monkeypatch.setattr(atomic.os, "fsync", fsync)
        monkeypatch.setattr(atomic.os, "replace", replace)

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    yield Recorder(monkeypatch)


def test_commit_writes_content_and_leaves_no_temp(tmp_path: pathlib.Path) -> None:
    """A clean exit puts exactly the written bytes at the path and removes nothing else."""
    target = tmp_path / "ckpt.pt"
    with atomic_write(str(target)) as f:
        f.write(PAYLOAD)
        assert not target.exists()  # nothing visible before the commit
    assert target.read_bytes() == PAYLOAD
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_durability_order_fsync_file_replace_fsync_dir(tmp_path: pathlib.Path, recorder: Recorder) -> None:
    """fsync(complete temp file) -> os.replace(temp, target) -> fsync(directory), in that order."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with atomic_write(str(target)) as f:
        f.write(PAYLOAD)
        temp_ino = os.fstat(f.fileno()).st_ino
    assert recorder.kinds() == ["fsync-file", "replace", "fsync-dir"]
    fsync_file, replace, fsync_dir = recorder.calls
    assert fsync_file[1:] == (str(temp_ino), str(len(PAYLOAD)))  # flushed before the fsync
    src, dst = replace[1], replace[2]
    assert os.path.dirname(src) == str(tmp_path)
    assert os.path.basename(src).startswith(".ckpt.pt" + TEMP_MARKER)
    assert dst == str(target)
    assert fsync_dir[1] == str(os.stat(tmp_path).st_ino)
    assert os.stat(target).st_ino == temp_ino  # the fsynced file is the one now in place
    assert target.read_bytes() == PAYLOAD


def test_failure_inside_the_block_removes_temp_and_keeps_old_file(tmp_path: pathlib.Path, recorder: Recorder) -> None:
    """An exception while writing propagates unchanged, deletes the temp, never renames, keeps the old file."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    boom = RuntimeError("writer died")
    with pytest.raises(RuntimeError) as info:
        with atomic_write(str(target)) as f:
            f.write(PAYLOAD)
            raise boom
    assert info.value is boom
    assert "replace" not in recorder.kinds()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_failed_rename_removes_temp_and_keeps_old_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If os.replace fails the error propagates, the temp is deleted and the old file is untouched."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    err = PermissionError("rename refused")

    def replace(src: str, dst: str) -> None:
        raise err

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(PermissionError) as info:
        with atomic_write(str(target)) as f:
            f.write(PAYLOAD)
    assert info.value is err
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("how", ["override", "env"])
def test_fsync_knob_zero_skips_fsync(
    tmp_path: pathlib.Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """fsync=0 (knob override or TORCHAUX_FSYNC=0) commits with os.replace but no fsync at all."""
    target = tmp_path / "ckpt.pt"
    if how == "env":
        monkeypatch.setenv("TORCHAUX_FSYNC", "0")
        with atomic_write(str(target)) as f:
            f.write(PAYLOAD)
    else:
        with _knobs.override(fsync=0):
            with atomic_write(str(target)) as f:
                f.write(PAYLOAD)
    assert recorder.kinds() == ["replace"]
    assert target.read_bytes() == PAYLOAD


def test_fsync_argument_overrides_the_knob(tmp_path: pathlib.Path, recorder: Recorder) -> None:
    """atomic_write(fsync=True) fsyncs even with the knob off; fsync=False skips it with the knob on."""
    with _knobs.override(fsync=0):
        with atomic_write(str(tmp_path / "a"), fsync=True) as f:
            f.write(b"a")
    assert recorder.kinds() == ["fsync-file", "replace", "fsync-dir"]
    recorder.calls.clear()
    with atomic_write(str(tmp_path / "b"), fsync=False) as f:
        f.write(b"b")
    assert recorder.kinds() == ["replace"]


def test_bad_fsync_env_value_is_a_clear_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-integer TORCHAUX_FSYNC raises ValueError naming the variable, before any file is created."""
    monkeypatch.setenv("TORCHAUX_FSYNC", "yes")
    with pytest.raises(ValueError, match="TORCHAUX_FSYNC"):
        with atomic_write(str(tmp_path / "ckpt.pt")):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("buffer_bytes", [0, 7, 1 << 20])
def test_write_buffer_knob_does_not_change_content(tmp_path: pathlib.Path, buffer_bytes: int) -> None:
    """Any write buffer size (0 = unbuffered) of the page-cache path yields the same content."""
    target = tmp_path / "ckpt.pt"
    with _knobs.override(write_buffer_bytes=buffer_bytes, direct_io=0):
        with atomic_write(str(target)) as f:
            for i in range(0, len(PAYLOAD), 1000):
                f.write(PAYLOAD[i : i + 1000])
    assert target.read_bytes() == PAYLOAD


def test_temp_path_is_hidden_unique_and_beside_the_target(tmp_path: pathlib.Path) -> None:
    """Temp names live in the target's directory, start with '.', carry the marker and pid, and differ."""
    target = str(tmp_path / "model.pt")
    names = {temp_path_for(target) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert os.path.dirname(name) == str(tmp_path)
        assert os.path.basename(name).startswith(f".model.pt{TEMP_MARKER}{os.getpid()}-")


def test_remove_stale_temps_spares_this_process(tmp_path: pathlib.Path) -> None:
    """remove_stale_temps deletes dead processes' temps, keeps ours and every non-temp file."""
    pid = os.getpid()
    dead = [4194305, 4194306]  # above Linux's largest pid_max (2**22): never alive
    other = [f".a.pt{TEMP_MARKER}{dead[0]}-00ff", f".b.pt{TEMP_MARKER}{dead[1]}-abcd", f".c.pt{TEMP_MARKER}{pid}0-ab"]
    own = f".a.pt{TEMP_MARKER}{pid}-1234"
    keep = ["a.pt", "notes.txt", ".hidden"]
    for name in [*other, own, *keep]:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / n) for n in other)
    assert sorted(os.listdir(tmp_path)) == sorted([own, *keep])
    assert remove_stale_temps(str(tmp_path), other_pids_only=False) == [str(tmp_path / own)]
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


@pytest.mark.multiprocess
def test_remove_stale_temps_spares_a_live_writer_process(tmp_path: pathlib.Path) -> None:
    """A temp written by another process that is still running (e.g. a ProcessSaver child) is kept."""
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = tmp_path / f".big.ckpt{TEMP_MARKER}{writer.pid}-beef"
        live.write_bytes(b"in flight")
        assert remove_stale_temps(tmp_path) == []
        assert live.exists()
    finally:
        writer.communicate(b"")
    # Dead and reaped now: its temp is stale.
    assert remove_stale_temps(tmp_path) == [str(live)]


def test_remove_stale_temps_of_one_pid(tmp_path: pathlib.Path) -> None:
    """pid= removes only that writer's temps (the parent cleaning up after its crashed child)."""
    mine = tmp_path / f".a.pt{TEMP_MARKER}{os.getpid()}-01"
    theirs = tmp_path / f".a.pt{TEMP_MARKER}4194305-02"
    for p in (mine, theirs):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path, pid=4194305) == [str(theirs)]
    assert mine.exists()


def test_remove_stale_temps_validates_arguments(tmp_path: pathlib.Path) -> None:
    """Wrong argument types are refused before anything is listed or deleted."""
    with pytest.raises(TypeError, match="directory must be a path"):
        remove_stale_temps(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pid must be an int"):
        remove_stale_temps(tmp_path, pid="12")  # type: ignore[arg-type]